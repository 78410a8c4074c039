"""Exports of a succeeded job's model (`POST /v1/fine_tuning/jobs/{id}/exports`): `merged` safetensors made by a
training worker (`worker.runner.export`), or the `adapter` zip the job already holds.

An export goes queued → running → succeeded or failed, each step a conditional UPDATE: a worker claims a queued
export (or a running one whose lease has passed) before it starts, renews its lease while it works, and
stores the zip under the job's prefix only once the whole folder is made and its fidelity is within bounds, so
a failed export leaves no object. Asking again for an export the job already has (same format and options,
queued, running or succeeded) returns that one, and publishes a queued one's message again if no worker has
claimed it within REPUBLISH_SECONDS (a message lost with the broker); a failed one is made anew. A running
export whose worker's lease has passed is shown as failed. Exports count in the tenant's storage
(`shared.quotas`) and are deleted with the fine-tuned model (`shared.catalog.service.delete_model`)."""

from sqlalchemy import or_, select, tuple_, update
from sqlalchemy.orm import Session

from shared import quotas
from shared.basemodels.models import BaseModelRecord
from shared.db import after_commit
from shared.errors import Conflict, NotFound, Unprocessable
from shared.exports.models import Export
from shared.exports.schemas import ExportCreate
from shared.ids import new_id, now
from shared.jobs.models import Job, JobEvent
from shared.jobs.status import JobStatus
from shared.queue import publish_export

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
WORKER_LOST = "the worker making it stopped before it finished; ask for it again"
REPUBLISH_SECONDS = 60  # a queued export no worker has claimed by then is published again when asked for again


class ExportNotReady(Conflict):
    def __init__(self, job_id: str, status: str):
        super().__init__(
            f"Job {job_id} is {status}; only a succeeded job's model can be exported", code="export_not_ready"
        )


def shown(export: Export, at: int | None = None) -> tuple[str, str | None]:
    """(status, error) as the API shows them: a running export whose lease has passed has failed."""
    if export.status == RUNNING and (export.lease_expires_at or 0) < (at if at is not None else now()):
        return FAILED, WORKER_LOST
    return export.status, export.error


def create_export(session: Session, tenant: str, job_id: str, request: ExportCreate) -> Export:
    from shared.jobs.service import get_job

    job = get_job(session, tenant, job_id)
    if job.status != JobStatus.SUCCEEDED:
        raise ExportNotReady(job_id, job.status)
    if job.model_deleted_at is not None or not job.adapter_key:
        raise NotFound(
            f"The adapter of {job_id} was deleted with its model {job.fine_tuned_model}: there is nothing to export",
            param="job_id",
            code="model_deleted",
        )
    if request.format == "gguf":
        refuse_gguf_of(session.get(BaseModelRecord, job.model), job.model)
    options = request.options()
    timestamp = now()
    for export in session.scalars(select(Export).where(Export.job_id == job.id, Export.format == request.format)):
        if export.options == options and shown(export)[0] != FAILED:
            if export.status == QUEUED and (export.lease_expires_at or 0) < timestamp:
                republish(session, export, job.priority, timestamp)  # no worker took it: its message may be lost
            return export  # asked for again: the one on its way, or made
    export = Export(
        id=new_id("ftexport"), job_id=job.id, tenant=tenant, format=request.format, options=options,
        status=QUEUED, created_at=timestamp, lease_expires_at=timestamp + REPUBLISH_SECONDS,
    )  # fmt: skip
    if request.format == "adapter":  # the object the job already holds: nothing to make or count again
        export.status, export.finished_at = SUCCEEDED, timestamp
        export.storage_key, export.sha256, export.bytes = job.adapter_key, job.adapter_sha256, job.adapter_bytes
        export.manifest = {"format": "tunequeue.export/1", "job_id": job.id, "export": {"format": "adapter"}}
    else:
        quotas.check_room(session, tenant)
        priority = job.priority
        after_commit(session, lambda: publish_export(export.id, priority))
    session.add(export)
    record(session, job, f"Export {export.id} requested: {describe(export)}")
    session.flush()
    return export


def republish(session: Session, export: Export, priority: int, timestamp: int) -> None:
    """Publish a queued export's message again, at most once a REPUBLISH_SECONDS: a duplicate finds it claimed."""
    taken = session.execute(
        update(Export)
        .where(Export.id == export.id, Export.status == QUEUED, Export.lease_expires_at == export.lease_expires_at)
        .values(lease_expires_at=timestamp + REPUBLISH_SECONDS)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    if taken:
        export_id = export.id
        after_commit(session, lambda: publish_export(export_id, priority))


GGUF_ARCHITECTURES = ("LlamaForCausalLM",)  # what `worker.training.gguf_export` writes


def refuse_gguf_of(base: BaseModelRecord | None, model_id: str) -> None:
    """A GGUF export of a base the converter does not write is refused when it is asked for (422)."""
    architecture = base.architecture if base is not None else "unknown"
    if architecture.split(":")[0] not in GGUF_ARCHITECTURES:
        raise Unprocessable(
            f"GGUF export writes {', '.join(GGUF_ARCHITECTURES)} models; {model_id} is {architecture}: export it as "
            "merged and convert that with llama.cpp's convert_hf_to_gguf.py",
            param="format",
        )


def describe(export: Export) -> str:
    details = ", ".join(f"{k} {v}" for k, v in export.options.items())
    return f"{export.format}" + (f" ({details})" if details else "")


def list_exports(session: Session, tenant: str, job_id: str, *, after: str | None, limit: int) -> list[Export]:
    """Newest first; `after` is the id of the last export already seen."""
    from shared.jobs.service import get_job

    job = get_job(session, tenant, job_id)
    query = select(Export).where(Export.job_id == job.id)
    if after:
        cursor = session.get(Export, after)
        if cursor is None or cursor.job_id != job.id:
            raise NotFound(f"Job {job_id} has no export {after!r}", param="after", code="export_not_found")
        query = query.where(tuple_(Export.created_at, Export.id) < tuple_(cursor.created_at, cursor.id))
    return list(session.scalars(query.order_by(Export.created_at.desc(), Export.id.desc()).limit(limit)))


def get_export(session: Session, tenant: str, job_id: str, export_id: str) -> Export:
    """One of the tenant's job's exports, or 404 (another job's id is as unknown as a made-up one)."""
    from shared.jobs.service import get_job

    job = get_job(session, tenant, job_id)
    export = session.get(Export, export_id, populate_existing=True)
    if export is None or export.job_id != job.id:
        raise NotFound(f"Job {job_id} has no export {export_id!r}", param="export_id", code="export_not_found")
    return export


def export_content(session: Session, tenant: str, job_id: str, export_id: str) -> Export:
    export = get_export(session, tenant, job_id, export_id)
    status, _ = shown(export)
    if status != SUCCEEDED or not export.storage_key:
        raise Conflict(
            f"Export {export_id} is {status}; its content can be downloaded once it has succeeded",
            code="export_not_ready",
        )
    return export


# The worker's side (`worker.tasks.export`).


def export_wanted(session: Session, export_id: str) -> Export | None:
    """The export, if a message for it is worth a slot: queued, or running under a lease that has passed."""
    export = session.get(Export, export_id)
    if export is None:
        return None
    if export.status == QUEUED or (export.status == RUNNING and (export.lease_expires_at or 0) < now()):
        return export
    return None


def claim_export(session: Session, export_id: str, lease_seconds: float) -> bool:
    timestamp = now()
    claimed = session.execute(
        update(Export)
        .where(
            Export.id == export_id,
            or_(Export.status == QUEUED, (Export.status == RUNNING) & (Export.lease_expires_at < timestamp)),
        )
        .values(status=RUNNING, lease_expires_at=timestamp + int(lease_seconds), progress="starting")
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    return bool(claimed)


def renew_export(session: Session, export_id: str, lease_seconds: float, progress: str | None = None) -> None:
    values: dict = {"lease_expires_at": now() + int(lease_seconds)}
    if progress is not None:
        values["progress"] = progress
    session.execute(update(Export).where(Export.id == export_id, Export.status == RUNNING).values(**values))


def finish_export(
    session: Session, export_id: str, key: str, sha256: str, size: int, manifest: dict, summary: str
) -> bool:
    """Succeeded, with its object; false if it is no longer running here or its job's model was deleted
    meanwhile (the caller then deletes the object)."""
    export = session.execute(select(Export).where(Export.id == export_id).with_for_update()).scalar_one_or_none()
    job = session.get(Job, export.job_id) if export is not None else None
    if export is None or job is None or export.status != RUNNING or job.model_deleted_at is not None:
        return False
    export.status, export.finished_at, export.lease_expires_at, export.progress = SUCCEEDED, now(), None, None
    export.storage_key, export.sha256, export.bytes, export.manifest = key, sha256, size, manifest
    record(session, job, f"Export {export_id} succeeded: {summary}")
    return True


def fail_export(session: Session, export_id: str, reason: str, manifest: dict | None = None) -> None:
    export = session.execute(select(Export).where(Export.id == export_id).with_for_update()).scalar_one_or_none()
    if export is None or export.status != RUNNING:
        return
    export.status, export.finished_at, export.lease_expires_at, export.progress = FAILED, now(), None, None
    export.error, export.manifest = reason, manifest
    job = session.get(Job, export.job_id)
    if job is not None:
        record(session, job, f"Export {export_id} failed: {reason}", level="error")


def record(session: Session, job: Job, message: str, level: str = "info") -> None:
    session.add(JobEvent(job_id=job.id, attempt=job.attempt, created_at=now(), level=level, message=message))
