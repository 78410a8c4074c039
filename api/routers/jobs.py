import json
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import After, Caller, DbSession, ReadSession, SettingsDep, StorageDep, Tenant, read
from api.docs import streamed
from api.downloads import content_disposition
from api.errors import ErrorResponse, declare
from api.responses import rendered
from api.streams import event_stream
from shared.errors import InvalidRequest
from shared.idempotency.service import idempotent, request_fingerprint
from shared.jobs import evaluations, service
from shared.jobs.estimate import dry_run
from shared.jobs.schemas import (
    CheckpointObject,
    DryRun,
    EvaluationState,
    FineTuningJob,
    JobCreate,
    JobEvaluation,
    JobEventObject,
)
from shared.jobs.status import JobStatus
from shared.pagination import Page

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=declare(409, 422, 429))


DRY_RUN_TIMEOUT: dict[int | str, dict[str, Any]] = {
    408: {"model": ErrorResponse, "description": "A dry run's data check passed its time limit"}
}


@router.post("", response_model=FineTuningJob | DryRun, responses=DRY_RUN_TIMEOUT)
async def create_job(
    session: DbSession,
    storage: StorageDep,
    settings: SettingsDep,
    tenant: Tenant,
    caller: Caller,
    request: JobCreate,
    idempotency_key: Annotated[str | None, Header()] = None,
):
    """Async so that a dry run awaits its data check (a thread of its own, bounded) without holding a request
    thread; the database work of both paths runs in the thread pool."""
    limits = {
        "max_active": settings.max_active_jobs_per_tenant,
        "max_queued": settings.max_queued_jobs_per_tenant,
        "max_priority": 9 if caller.admin else settings.max_tenant_priority,
    }
    if request.dry_run:
        return await dry_run(session, storage, settings, tenant, request, **limits)

    def create() -> dict:
        job = service.create_job(session, tenant, request, **limits)
        return FineTuningJob.of(job).model_dump(mode="json")

    fingerprint = request_fingerprint(request.model_dump(mode="json"))
    return await run_in_threadpool(
        idempotent, session, tenant, idempotency_key, "POST /v1/fine_tuning/jobs", fingerprint, create
    )


@router.get("", response_model=Page[FineTuningJob])
def list_jobs(
    session: ReadSession,
    tenant: Tenant,
    http: Request,
    after: After = None,
    limit: int = Query(20, ge=1, le=100),
    status: Annotated[JobStatus | None, Query(description="only jobs in this status (tunequeue extension)")] = None,
):
    jobs = service.list_jobs(
        session, tenant, after=after, limit=limit + 1, metadata=_metadata_filter(http), status=status
    )
    return rendered(Page[FineTuningJob].of(jobs, limit, FineTuningJob.of))


def _metadata_filter(http: Request) -> dict[str, str] | None:
    # The SDK sends metadata={"k": "v"} as the query parameters metadata[k]=v; metadata={"k":"v"} (JSON) works too.
    found = {key[9:-1]: value for key, value in http.query_params.items() if key.startswith("metadata[")}
    raw = http.query_params.get("metadata")
    if raw:
        found.update(_metadata_object(raw))
    return found or None


def _metadata_object(raw: str) -> dict[str, str]:
    try:
        parsed = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):  # deep nesting: refused like any other non-object
        parsed = None
    if not isinstance(parsed, dict) or not all(isinstance(value, str) for value in parsed.values()):
        raise InvalidRequest(
            'metadata must be a JSON object of strings, e.g. metadata={"team":"ml"} (or metadata[team]=ml)',
            param="metadata",
        )
    return parsed


# What clients poll. Async, so that the key check (cached) and the rendering stay on the event loop and only
# the query goes through the thread pool.
@router.get("/{job_id}", response_model=FineTuningJob)
async def retrieve_job(tenant: Tenant, job_id: str):
    return rendered(FineTuningJob.of(await read(service.read_job, tenant, job_id)))


@router.post("/{job_id}/cancel", response_model=FineTuningJob)
def cancel_job(session: DbSession, tenant: Tenant, job_id: str):
    return FineTuningJob.of(service.cancel_job(session, tenant, job_id))


@router.post("/{job_id}/pause", response_model=FineTuningJob)
def pause_job(session: DbSession, tenant: Tenant, job_id: str):
    return FineTuningJob.of(service.pause_job(session, tenant, job_id))


@router.post("/{job_id}/resume", response_model=FineTuningJob)
def resume_job(session: DbSession, tenant: Tenant, job_id: str):
    return FineTuningJob.of(service.resume_job(session, tenant, job_id))


@router.get(
    "/{job_id}/events",
    response_model=Page[JobEventObject],
    responses={
        200: {
            "content": {
                "text/event-stream": {
                    "schema": {"type": "string"},
                    "example": 'id: ftevent-1a2b\ndata: {"object": "fine_tuning.job.event", ...}\n\n',
                }
            },
            "description": "A page of events, newest first; with `stream=true`, a server-sent event stream",
        }
    },
)
async def list_events(
    request: Request,
    tenant: Tenant,
    job_id: str,
    after: After = None,
    limit: int = Query(20, ge=1, le=1000),
    stream: bool = Query(
        False,
        description="Server-sent events instead of a page: every event from the first (or after `Last-Event-ID`), "
        "oldest first, then new ones as they are written, `event: job` on each status or progress change, "
        "`event: end` at a terminal status (tunequeue extension)",
    ),
    last_event_id: Annotated[
        str | None,
        Header(alias="Last-Event-ID", max_length=128, description="resume a stream after this event id"),
    ] = None,
):
    if stream:
        return await event_stream(request, tenant, job_id, last_event_id)
    # Polled beside the job: async, its two queries in one trip through the thread pool.
    events = await read(service.read_events, tenant, job_id, after=after, limit=limit + 1)
    return rendered(Page[JobEventObject].of(events, limit, JobEventObject.of))


@router.get("/{job_id}/checkpoints", response_model=Page[CheckpointObject])
def list_checkpoints(
    session: ReadSession, tenant: Tenant, job_id: str, after: After = None, limit: int = Query(10, ge=1, le=100)
):
    job = service.get_job(session, tenant, job_id)
    checkpoints = service.list_checkpoints(session, job, after=after, limit=limit + 1)
    name = service.fine_tuned_model_name(job)
    return Page[CheckpointObject].of(checkpoints, limit, lambda c: CheckpointObject.of(c, name)).with_ids()


@router.get("/{job_id}/evaluation", response_model=JobEvaluation | EvaluationState, responses=declare(404))
def job_evaluation(session: ReadSession, tenant: Tenant, job_id: str):
    """tunequeue's own: the delivered adapter against the base model on the job's validation set (both models'
    loss and token accuracy, and their greedy answers to the first validation prompts side by side). 409 until
    the job has succeeded; while an evaluation asked for with POST is being made, its `status` (`queued`,
    `running`, `failed` with `error`); 404, saying why, when it has none."""
    return evaluation_or_state(service.get_job(session, tenant, job_id), session, tenant)


@router.post(
    "/{job_id}/evaluation",
    response_model=JobEvaluation | EvaluationState,
    responses={**declare(404), 202: {"model": EvaluationState, "description": "Queued or being made"}},
)
def request_evaluation(session: DbSession, tenant: Tenant, job_id: str, response: Response):
    """tunequeue's own: make the evaluation of a succeeded job that has none (it ran before every job was
    evaluated, or its evaluation failed), on a training worker. 202 with its `status` while it is queued or
    running (poll GET); 200 with the evaluation once there is one. Asking again while one is on its way starts
    nothing more."""
    job = evaluations.request_evaluation(session, tenant, job_id)
    shown = evaluation_or_state(job, session, tenant)
    if isinstance(shown, EvaluationState):
        response.status_code = 202
    return shown


def evaluation_or_state(job, session, tenant: str) -> JobEvaluation | EvaluationState:
    status = evaluations.shown_status(job)
    if status in (evaluations.QUEUED, evaluations.RUNNING, evaluations.FAILED):
        return EvaluationState.of(job, status, evaluations.shown_error(job))
    return JobEvaluation.of(evaluations.finished_evaluation(session, tenant, job.id))


@router.get(
    "/{job_id}/checkpoints/{checkpoint_id}/content",
    response_class=StreamingResponse,
    responses=streamed("application/zip", "the checkpoint as a zip; its sha256 in X-Checkpoint-SHA256"),
)
def checkpoint_content(session: DbSession, storage: StorageDep, tenant: Tenant, job_id: str, checkpoint_id: str):
    """tunequeue's own: a checkpoint as a zip (the adapter at that step, and for a resumable one the optimizer,
    schedule, RNG and data position it resumes from)."""
    checkpoint = service.get_checkpoint(session, tenant, job_id, checkpoint_id)
    return StreamingResponse(
        storage.iter_chunks(checkpoint.storage_key),
        media_type="application/zip",
        headers={
            "Content-Disposition": content_disposition(f"{job_id}-step-{checkpoint.step}.zip"),
            "X-Checkpoint-SHA256": checkpoint.sha256,
        },
    )


@router.get(
    "/{job_id}/attempts/{attempt}/log",
    response_class=StreamingResponse,
    responses={**declare(404), **streamed("text/plain", "what the attempt printed")},
)
def attempt_log(session: DbSession, storage: StorageDep, tenant: Tenant, job_id: str, attempt: int):
    """tunequeue's own: what one attempt printed (the recipe's output, and every rank's stderr with its rank in
    front), as text. Kept when the attempt's training process ends, whatever the outcome."""
    job = service.get_job(session, tenant, job_id)
    key = service.attempt_log_key(storage, job, attempt)
    return StreamingResponse(storage.iter_chunks(key), media_type="text/plain; charset=utf-8")


@router.get(
    "/{job_id}/adapter",
    response_class=StreamingResponse,
    responses=streamed("application/zip", "the adapter as a zip; its sha256 in X-Adapter-SHA256"),
)
def download_adapter(session: DbSession, storage: StorageDep, tenant: Tenant, job_id: str):
    """tunequeue's own: the trained adapter as a zip (adapter_config.json, adapter_model.safetensors, manifest.json)."""
    key, sha256 = service.downloadable_adapter(session, tenant, job_id)
    return StreamingResponse(
        storage.iter_chunks(key),
        media_type="application/zip",
        headers={
            "Content-Disposition": content_disposition(f"{job_id}-adapter.zip"),
            "X-Adapter-SHA256": sha256 or "",
        },
    )
