"""Fine-tuning jobs: creation, queries and cancel for the API; claim, progress and completion for workers.
Services flush; the caller commits. Publishing a task is registered to run after the commit."""

import random
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Connection, Row, and_, bindparam, cast, exists, func, select, tuple_, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from shared import quotas
from shared.basemodels.models import BaseModelRecord
from shared.basemodels.service import check_target_modules, get_base_model
from shared.db import after_commit
from shared.errors import InvalidRequest, NotFound, RateLimited, Unprocessable
from shared.files.models import File
from shared.files.service import get_file
from shared.ids import new_id, now
from shared.jobs import state
from shared.jobs.dispatch import dispatch_training
from shared.jobs.errors import (
    AdapterNotReady,
    JobConflict,
    JobNotCancellable,
    JobNotFound,
)
from shared.jobs.hyperparameters import resolve_hyperparameters
from shared.jobs.models import Checkpoint, Job, JobEvent
from shared.jobs.schemas import JobCreate
from shared.jobs.status import JobStatus
from shared.queue import VALIDATE_TASK, publish
from shared.storage import Storage
from shared.workers.service import largest_slot_count


@dataclass(frozen=True)
class Admission:
    """What a request that passed every admission check refers to."""

    base: BaseModelRecord
    training: File
    validation: File | None


def admit_job(
    session: Session,
    tenant: str,
    request: JobCreate,
    max_active: int = 100,
    max_queued: int | None = None,
    max_priority: int = 9,
) -> Admission:
    """Every check a new job must pass before anything is written: the base model, the key's priority limit,
    worker capacity, target modules, both files and the tenant's job limits. The create and the dry run both
    call it, so that a dry run that passes means the create would too. Also the tenant's storage quota."""
    base = get_base_model(session, request.model)
    if request.priority > max_priority:
        raise InvalidRequest(
            f"priority {request.priority} is above this key's limit of {max_priority} "
            "(TUNEQUEUE_MAX_TENANT_PRIORITY; admin keys may use up to 9)",
            param="priority",
        )
    check_capacity(session, request.resources.devices)
    check_target_modules(base, request.lora_target_modules)
    training = training_file(session, tenant, request.training_file, "training_file")
    validation = None
    if request.validation_file:
        validation = training_file(session, tenant, request.validation_file, "validation_file")
    by_status = _active_by_status(session, tenant)
    active = sum(by_status.values())
    if active >= max_active:
        raise RateLimited(
            f"{active} of your jobs are unfinished, the limit is {max_active} (TUNEQUEUE_MAX_ACTIVE_JOBS_PER_TENANT); "
            "retry when some have finished",
            retry_after=60,
        )
    waiting = by_status.get(JobStatus.VALIDATING, 0) + by_status.get(JobStatus.QUEUED, 0)
    if max_queued is not None and waiting >= max_queued:
        raise RateLimited(
            f"{waiting} of your jobs are waiting to run, the limit is {max_queued} "
            "(TUNEQUEUE_MAX_QUEUED_JOBS_PER_TENANT); retry when some have started",
            retry_after=30,
        )
    quotas.check_room(session, tenant)  # a job stores checkpoints and an adapter: none for a tenant already full
    return Admission(base, training, validation)


def create_job(
    session: Session,
    tenant: str,
    request: JobCreate,
    max_active: int = 100,
    max_queued: int | None = None,
    max_priority: int = 9,
) -> Job:
    training = admit_job(session, tenant, request, max_active, max_queued, max_priority).training
    timestamp = now()
    job = Job(
        id=new_id("ftjob"),
        tenant=tenant,
        status=JobStatus.VALIDATING,
        model=request.model,
        training_file=training.id,
        validation_file=request.validation_file,
        suffix=request.suffix or None,
        seed=request.seed if request.seed is not None else random.randint(0, 2**31 - 1),
        hyperparameters=resolve_hyperparameters(request.requested_hyperparameters(), training.line_count),
        training_options=request.training_options(),
        user_metadata=request.metadata,
        priority=request.priority,
        devices=request.resources.devices,
        result_files=[],
        attempt=0,
        cancel_requested=False,
        created_at=timestamp,
        updated_at=timestamp,
    )
    session.add(job)
    session.add(JobEvent(job_id=job.id, created_at=timestamp, message=f"Created fine-tuning job: {job.id}"))
    session.flush()
    state.entered(session, tenant, job.id, JobStatus.VALIDATING)
    job_id = job.id
    after_commit(session, lambda: publish(VALIDATE_TASK, job_id))
    return job


def _active_by_status(session: Session, tenant: str) -> dict[str, int]:
    query = select(Job.status, func.count()).where(Job.tenant == tenant, Job.status.in_(state.ACTIVE))
    return {status: count for status, count in session.execute(query.group_by(Job.status))}


def check_capacity(session: Session, devices: int) -> None:
    """A job that no registered worker could ever run is refused now, not left queued forever. Workers
    report their slots in heartbeats; those seen in the last day count."""
    if devices == 1:
        return  # every worker has at least one slot
    largest = largest_slot_count(session, seen_since=now() - 86400)
    if devices > largest:
        raise InvalidRequest(
            f"no registered worker can run a job on {devices} devices (the largest has {largest}); "
            "start `tunequeue worker --devices …` on a bigger node or ask for fewer",
            param="resources.devices",
            code="no_capable_worker",
        )


def training_file(session: Session, tenant: str, file_id: str, param: str) -> File:
    file = get_file(session, tenant, file_id, param=param)
    if file.purpose != "fine-tune":
        raise Unprocessable(
            f"{file_id} has purpose {file.purpose!r}; training data must be uploaded with purpose 'fine-tune'",
            param=param,
        )
    return file


def get_job(session: Session, tenant: str | None, job_id: str, param: str | None = None) -> Job:
    """The tenant's job, or 404 (also for another tenant's: existence is not revealed). None: any tenant,
    for admin routes only."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or (tenant is not None and job.tenant != tenant):
        raise JobNotFound(job_id, param=param)
    return job


# What a job's API representation (`FineTuningJob.of`) reads: the read path below selects only these.
SHOWN_COLUMNS = tuple(
    getattr(Job, name)
    for name in (
        "id", "tenant", "status", "model", "training_file", "validation_file", "suffix", "seed", "hyperparameters",
        "training_options", "user_metadata", "fine_tuned_model", "trained_tokens", "error", "result_files",
        "priority", "devices", "progress", "validation_report", "created_at", "finished_at", "estimated_finish",
    )
)  # fmt: skip


# The polled reads' statements, built once: executing the same statement object lets SQLAlchemy reuse its
# compiled form and its result metadata as they are. A statement built per request is compiled from the cache
# too, but its result columns are then matched to the cached ones again on every execution (~0.5 ms of CPU
# per request, more than the rest of the query).
_JOB_SHOWN = select(*SHOWN_COLUMNS).where(Job.id == bindparam("job_id"), Job.tenant == bindparam("tenant"))
_JOB_OF_TENANT = select(Job.id).where(Job.id == bindparam("job_id"), Job.tenant == bindparam("tenant"))
_EVENT_SEQ = select(JobEvent.seq).where(
    JobEvent.job_id == bindparam("job_id"), JobEvent.public_id == bindparam("event")
)
_EVENTS = select(*JobEvent.__table__.columns).where(JobEvent.job_id == bindparam("job_id"))
_EVENTS_NEWEST = _EVENTS.order_by(JobEvent.seq.desc()).limit(bindparam("limit"))
_EVENTS_BEFORE = _EVENTS.where(JobEvent.seq < bindparam("seq")).order_by(JobEvent.seq.desc()).limit(bindparam("limit"))
_EVENTS_SINCE = _EVENTS.where(JobEvent.seq > bindparam("seq")).order_by(JobEvent.seq.asc()).limit(bindparam("limit"))


def read_job(connection: Connection, tenant: str, job_id: str) -> Job:
    """`get_job` for the hottest read route (a client polling its job): one SELECT of the shown columns with
    the tenant in the WHERE, on a plain connection, without a session. The Job returned belongs to no session
    and carries only SHOWN_COLUMNS: for showing, never for changing."""
    row = connection.execute(_JOB_SHOWN, {"job_id": job_id, "tenant": tenant}).first()
    if row is None:
        raise JobNotFound(job_id)  # another tenant's job is as unknown as a made-up id
    return Job(**row._mapping)


def _check_job(connection: Connection, tenant: str, job_id: str) -> None:
    if connection.execute(_JOB_OF_TENANT, {"job_id": job_id, "tenant": tenant}).first() is None:
        raise JobNotFound(job_id)


def read_events(connection: Connection, tenant: str, job_id: str, *, after: str | None, limit: int) -> list[Row]:
    """`get_job` then `list_events`, for the events route: the tenant's job or 404, then one page, each in one
    SELECT on a plain connection. The events are the rows as read (every column, by name), not ORM objects:
    building those was an eighth of the route's CPU, for a page that is only shown."""
    _check_job(connection, tenant, job_id)
    if after:
        seq = _event_seq(connection, Job(id=job_id), after)
        rows = connection.execute(_EVENTS_BEFORE, {"job_id": job_id, "seq": seq, "limit": limit})
    else:
        rows = connection.execute(_EVENTS_NEWEST, {"job_id": job_id, "limit": limit})
    return list(rows)


def event_seq(connection: Connection, tenant: str, job_id: str, event_id: str) -> int:
    """Where a stream resumes (`Last-Event-ID`): the tenant's job or 404, then the event's position in it or
    404 naming the header."""
    _check_job(connection, tenant, job_id)
    seq = connection.scalars(_EVENT_SEQ, {"job_id": job_id, "event": event_id}).first()
    if seq is None:
        raise NotFound(
            f"Last-Event-ID: job {job_id} has no event {event_id!r}; send the id of the last event received",
            param="Last-Event-ID",
            code="event_not_found",
        )
    return seq


def read_events_since(
    connection: Connection, tenant: str, job_id: str, *, after_seq: int, limit: int
) -> tuple[Job, list[JobEvent]]:
    """For a stream of a job's events: the job (shown columns, the tenant's or 404) and its events written
    after position `after_seq`, oldest first, in two SELECTs on a plain connection."""
    job = read_job(connection, tenant, job_id)
    rows = connection.execute(_EVENTS_SINCE, {"job_id": job_id, "seq": after_seq, "limit": limit})
    return job, [JobEvent(**row._mapping) for row in rows]


def list_jobs(
    session: Session,
    tenant: str | None,
    *,
    after: str | None,
    limit: int,
    metadata: dict[str, str] | None = None,
    status: JobStatus | None = None,
    model: str | None = None,
) -> list[Job]:
    """Newest first, one page in one query: the filters, the keyset and LIMIT all run in the database, so a
    page costs the same however many jobs the tenant has (index `ix_jobs_tenant_created_id`)."""
    query = select(Job)
    if tenant is not None:
        query = query.where(Job.tenant == tenant)
    if status is not None:
        query = query.where(Job.status == status)
    if model is not None:
        query = query.where(Job.model == model)
    if metadata:
        query = query.where(metadata_matches(session, metadata))
    if after:
        created_at, job_id = _job_position(session, tenant, after)
        query = query.where(tuple_(Job.created_at, Job.id) < tuple_(created_at, job_id))
    return list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)))


def _job_position(session: Session, tenant: str | None, job_id: str) -> tuple[int, str]:
    """Where a cursor job sits in the order. Looked up within the tenant: another tenant's job id is as
    unknown as a made-up one."""
    query = select(Job.created_at, Job.id).where(Job.id == job_id)
    if tenant is not None:
        query = query.where(Job.tenant == tenant)
    found = session.execute(query).first()
    if found is None:
        raise JobNotFound(job_id, param="after")
    return found[0], found[1]


def metadata_matches(session: Session, metadata: dict[str, str]) -> ColumnElement[bool]:
    """Jobs whose metadata holds every pair given. On Postgres, JSONB containment, which the GIN index
    `ix_jobs_user_metadata` answers; on SQLite, json_each, which reads any key (a JSON path cannot spell a key
    with a double quote in it)."""
    if session.get_bind().dialect.name == "postgresql":
        return cast(Job.user_metadata, JSONB).contains(metadata)
    pairs = func.json_each(Job.user_metadata).table_valued("key", "value", "type")
    return and_(
        *(
            exists().where(pairs.c.key == key, pairs.c.type == "text", pairs.c.value == value)
            for key, value in metadata.items()
        )
    )


def cancel_job(session: Session, tenant: str | None, job_id: str) -> Job:
    """Queued or validating jobs are cancelled at once; a running job is flagged and its worker stops it."""
    job = get_job(session, tenant, job_id)
    if job.status in state.TERMINAL:
        raise JobNotCancellable(job_id, job.status)
    if state.transition(
        session, job_id, JobStatus.CANCELLED, expect={JobStatus.VALIDATING, JobStatus.QUEUED, JobStatus.PAUSED}
    ):
        return get_job(session, tenant, job_id)
    session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True, updated_at=now()))
    session.add(JobEvent(job_id=job_id, attempt=job.attempt, created_at=now(), message="Cancellation requested"))
    session.flush()
    return get_job(session, tenant, job_id)


def pause_job(session: Session, tenant: str, job_id: str) -> Job:
    """A running job finishes its current step, saves its whole state as a checkpoint and frees its worker."""
    job = get_job(session, tenant, job_id)
    if job.status != JobStatus.RUNNING:
        raise JobConflict(f"Job {job_id} is {job.status}; only a running job can be paused", "job_not_running")
    session.execute(update(Job).where(Job.id == job_id).values(pause_requested=True, updated_at=now()))
    session.add(JobEvent(job_id=job_id, attempt=job.attempt, created_at=now(), message="Pause requested"))
    session.flush()
    return get_job(session, tenant, job_id)


def resume_job(session: Session, tenant: str, job_id: str) -> Job:
    """paused → queued; the next worker continues from the saved state (same step count and schedule)."""
    job = get_job(session, tenant, job_id)
    if not state.transition(
        session, job_id, JobStatus.QUEUED, expect={JobStatus.PAUSED}, message="Resumed; job queued"
    ):
        raise JobConflict(f"Job {job_id} is {job.status}; only a paused job can be resumed", "job_not_paused")
    after_commit(session, lambda: dispatch_training(job_id))
    return get_job(session, tenant, job_id)


def list_events(session: Session, job: Job, *, after: str | None, limit: int) -> list[JobEvent]:
    """Newest first, as OpenAI returns them; `after` is the id of the last event already seen. Ids are random
    (`public_id`); the order is the insertion order (`seq`), which is never shown."""
    query = select(JobEvent).where(JobEvent.job_id == job.id)
    if after:
        query = query.where(JobEvent.seq < _event_seq(session, job, after))
    return list(session.scalars(query.order_by(JobEvent.seq.desc()).limit(limit)))


def _event_seq(session: Session | Connection, job: Job, event_id: str) -> int:
    """The position of one of this job's events; any other id (another job's, a made-up one) is the same 404."""
    seq = session.scalars(_EVENT_SEQ, {"job_id": job.id, "event": event_id}).first()
    if seq is None:
        raise _unknown_cursor("event", event_id, job)
    return seq


def list_checkpoints(session: Session, job: Job, *, after: str | None, limit: int) -> list[Checkpoint]:
    """Highest step first; `after` is the id of the last checkpoint already seen, looked up within this job."""
    query = select(Checkpoint).where(Checkpoint.job_id == job.id)
    if after:
        cursor = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.id == after)).first()
        if cursor is None:
            raise _unknown_cursor("checkpoint", after, job)
        query = query.where(tuple_(Checkpoint.step, Checkpoint.id) < tuple_(cursor.step, cursor.id))
    return list(session.scalars(query.order_by(Checkpoint.step.desc(), Checkpoint.id.desc()).limit(limit)))


def get_checkpoint(session: Session, tenant: str, job_id: str, checkpoint_id: str) -> Checkpoint:
    """One of the tenant's job's checkpoints, or 404 (an id of another job is as unknown as a made-up one)."""
    job = get_job(session, tenant, job_id)
    checkpoint = session.scalars(
        select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.id == checkpoint_id)
    ).first()
    if checkpoint is None:
        raise NotFound(
            f"Job {job_id} has no checkpoint {checkpoint_id!r}", param="checkpoint_id", code="checkpoint_not_found"
        )
    return checkpoint


def _unknown_cursor(what: str, cursor: str, job: Job) -> NotFound:
    return NotFound(
        f"after: job {job.id} has no {what} {cursor!r}; pass the id of the last {what} of the previous page",
        param="after",
        code=f"{what}_not_found",
    )


ATTEMPT_LOG = "attempt.log"


def attempt_prefix(tenant: str, job_id: str, attempt: int) -> str:
    """Where an attempt's objects live (checkpoints, adapter, log); only a fenced DB write promotes one."""
    return f"tenants/{tenant}/jobs/{job_id}/attempt-{attempt}"


def attempt_log_key(storage: Storage, job: Job, attempt: int) -> str:
    """The storage key of an attempt's log (the recipe's output and every rank's stderr), or 404 saying why."""
    if not 1 <= attempt <= job.attempt:
        raise NotFound(
            f"Job {job.id} has had {job.attempt} attempt(s); there is no attempt {attempt}",
            param="attempt",
            code="attempt_not_found",
        )
    key = f"{attempt_prefix(job.tenant, job.id, attempt)}/{ATTEMPT_LOG}"
    if not storage.exists(key):
        raise NotFound(
            f"Attempt {attempt} of {job.id} has no log: it is kept when the training process ends, and this one "
            "is still running or its worker was lost with it",
            param="attempt",
            code="attempt_log_not_found",
        )
    return key


def fine_tuned_model_name(job: Job) -> str:
    return f"ft:{job.model}:{job.suffix or ''}:{job.id}"


def downloadable_adapter(session: Session, tenant: str, job_id: str) -> tuple[str, str | None]:
    """The storage key and sha256 of a job's adapter, once it has succeeded and while its model is not deleted."""
    job = get_job(session, tenant, job_id)
    if job.model_deleted_at is not None:
        raise NotFound(
            f"The adapter of {job_id} was deleted with its model {job.fine_tuned_model}", code="model_deleted"
        )
    if job.status != JobStatus.SUCCEEDED or not job.adapter_key:
        raise AdapterNotReady(job_id, job.status)
    return job.adapter_key, job.adapter_sha256


def counts_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status))
    counts: dict[str, int] = dict.fromkeys(state.ALL_STATUSES, 0)
    counts.update({status: count for status, count in rows})
    return counts


def counts_by_tenant(session: Session) -> dict[str, dict[str, int]]:
    """Each tenant with jobs, and its jobs by status (only the statuses it has)."""
    counts: dict[str, dict[str, int]] = {}
    rows = session.execute(select(Job.tenant, Job.status, func.count()).group_by(Job.tenant, Job.status))
    for tenant, status, count in rows:
        counts.setdefault(tenant, {})[status] = count
    return counts


def status_events(session: Session, job: Job, limit: int = 500) -> list[JobEvent]:
    """A job's transitions, oldest first (the events that carry a status): its timeline, attempt by attempt."""
    query = select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.type == "message").order_by(JobEvent.seq)
    return [event for event in session.scalars(query.limit(limit)) if (event.data or {}).get("status")]


def running_jobs(session: Session) -> list[Job]:
    """Every tenant's, longest running first."""
    query = select(Job).where(Job.status == JobStatus.RUNNING).order_by(Job.started_at)
    return list(session.scalars(query))


def recent_failures(session: Session, limit: int = 10) -> list[Job]:
    query = select(Job).where(Job.status == JobStatus.FAILED).order_by(Job.finished_at.desc()).limit(limit)
    return list(session.scalars(query))


def finished_since(session: Session, since: dict[str, int]) -> dict[str, dict[str, int]]:
    """Jobs that ended since each of the given times, by status (throughput over the last hour, the last day):
    one query over the jobs that ended since the earliest time (index `ix_jobs_finished_at`)."""
    counts = [func.count().filter(Job.finished_at >= at) for at in since.values()]
    rows = session.execute(
        select(Job.status, *counts).where(Job.finished_at >= min(since.values())).group_by(Job.status)
    ).all()
    return {name: {str(row[0]): int(row[i + 1]) for row in rows if row[i + 1]} for i, name in enumerate(since)}
