"""What a worker may write about a job it has claimed. Every write after the claim is fenced by `attempt`:
a worker whose attempt is stale (the job was re-claimed or finished) changes nothing."""

from dataclasses import dataclass

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from shared.ids import new_id, now
from shared.jobs import state
from shared.jobs.models import Checkpoint, Job, JobEvent


def claim_job(
    session: Session, job_id: str, worker: str, lease_seconds: float = 60, max_running: int | None = None
) -> int | None:
    """queued → running with attempt+1 and a fresh lease; returns the new attempt, or None if another worker
    has the job, it was cancelled meanwhile, or its tenant already has `max_running` jobs running (then it
    stays queued and the sweeper offers it again)."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.status != state.QUEUED or job.cancel_requested:
        return None
    if max_running is not None and tenant_at_running_limit(session, job.tenant, max_running):
        if not session.scalar(
            select(JobEvent.seq).where(JobEvent.job_id == job_id, JobEvent.type == "waiting").limit(1)
        ):
            add_waiting_event(session, job_id, max_running)
        return None
    attempt = job.attempt + 1
    won = state.transition(
        session,
        job_id,
        state.RUNNING,
        expect={state.QUEUED},
        fenced_attempt=job.attempt,
        message=f"Fine-tuning job started (attempt {attempt})",  # the worker is the admins' to see
        attempt=attempt,
        worker=worker,
        started_at=now(),
        lease_expires_at=now() + int(lease_seconds),
    )
    return attempt if won else None


def tenant_to_serve_first(session: Session, job: Job, max_devices: int, max_running: int | None = None) -> str | None:
    """Fair share: the tenant (other than this job's) that should start before this job, if any: one with a
    queued job of at least this priority that has fewer jobs running, or as many and was served longer ago.
    None: this job may go. One tenant's 100 jobs thus take turns with another tenant's one."""
    mine = tenant_load(session, job.tenant)
    waiting = session.execute(
        select(Job.tenant)
        .where(
            Job.status == state.QUEUED,
            Job.priority >= job.priority,
            Job.tenant != job.tenant,
            Job.devices <= max_devices,  # only jobs this worker could run instead
            Job.cancel_requested.is_(False),
        )
        .distinct()
    ).scalars()
    for tenant in waiting:
        theirs = tenant_load(session, tenant)
        if max_running is not None and theirs[0] >= max_running:
            continue  # that tenant cannot start another job anyway
        if theirs < mine:
            return tenant
    return None


def tenant_load(session: Session, tenant: str) -> tuple[int, int]:
    """(jobs running, when the tenant last started one): lower goes first."""
    running, last_start = session.execute(
        select(
            func.count().filter(Job.status == state.RUNNING),
            func.coalesce(func.max(Job.started_at), 0),
        ).where(Job.tenant == tenant)
    ).one()
    return running or 0, last_start or 0


def tenant_at_running_limit(session: Session, tenant: str, max_running: int) -> bool:
    if session.get_bind().dialect.name == "postgresql":
        # Claims of one tenant's jobs take turns here, so that two workers cannot both see one slot left.
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:tenant))"), {"tenant": f"running:{tenant}"})
    running = session.scalar(select(func.count()).where(Job.tenant == tenant, Job.status == state.RUNNING))
    return (running or 0) >= max_running


def add_waiting_event(session: Session, job_id: str, max_running: int) -> None:
    session.add(
        JobEvent(
            job_id=job_id,
            created_at=now(),
            type="waiting",
            message=f"Waiting: this tenant already has {max_running} jobs running "
            "(TUNEQUEUE_MAX_RUNNING_JOBS_PER_TENANT); the job starts when one finishes",
        )
    )
    session.flush()


def renew_lease(session: Session, job_id: str, attempt: int, lease_seconds: float) -> bool:
    """Extend this attempt's lease; False once the attempt is no longer the job's (stop working on it)."""
    changed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempt == attempt, Job.status == state.RUNNING)
        .values(lease_expires_at=now() + int(lease_seconds))
    ).rowcount  # type: ignore[attr-defined]
    return bool(changed)


def requeue_job(
    session: Session, job_id: str, attempt: int, reason: str, *, max_attempts: int, code: str = "worker_lost"
) -> str | None:
    """Give up this attempt without failing the job: back to `queued` for another attempt (which resumes from
    the newest verified checkpoint). Returns the job's new status, or None if the attempt was already stale.
    A requested cancel or pause is honoured here; after `max_attempts` the job fails with `worker_lost`."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.status != state.RUNNING or job.attempt != attempt:
        return None
    checkpoint = newest_resumable_checkpoint(session, job_id)
    where = f"step {checkpoint.step}" if checkpoint else "the start"
    values: dict = {"lease_expires_at": None, "worker": None}
    if job.cancel_requested:
        target, message = state.CANCELLED, f"{reason}; the job was cancelled"
    elif job.pause_requested:
        target, message = state.PAUSED, f"{reason}; paused, resume continues from {where}"
        values["pause_requested"] = False
    elif attempt >= max_attempts:
        message = f"{reason}; giving up after {attempt} attempt(s) (TUNEQUEUE_MAX_ATTEMPTS={max_attempts})"
        return state.FAILED if fail_job(session, job_id, attempt, code, message) else None
    else:
        target, message = (
            state.QUEUED,
            f"{reason}; requeued: attempt {attempt + 1} of {max_attempts} resumes from {where}",
        )
    moved = state.transition(
        session, job_id, target, expect={state.RUNNING}, fenced_attempt=attempt, message=message, **values
    )
    return target if moved else None


def newest_resumable_checkpoint(session: Session, job_id: str) -> Checkpoint | None:
    return next(iter(resumable_checkpoints(session, job_id, limit=1)), None)


def resumable_checkpoints(session: Session, job_id: str, limit: int | None = None) -> list[Checkpoint]:
    """Checkpoints with full training state, newest first: a resume tries them in this order."""
    statement = (
        select(Checkpoint)
        .where(Checkpoint.job_id == job_id, Checkpoint.resumable.is_(True))
        .order_by(Checkpoint.step.desc(), Checkpoint.created_at.desc())
    )
    return list(session.scalars(statement.limit(limit) if limit else statement))


def mark_checkpoint_unusable(session: Session, job_id: str, attempt: int, checkpoint_id: str) -> bool:
    """A checkpoint whose stored bytes failed verification is never resumed from again (fenced)."""
    if not is_current(session, job_id, attempt):
        return False
    session.execute(
        update(Checkpoint).where(Checkpoint.id == checkpoint_id, Checkpoint.job_id == job_id).values(resumable=False)
    )
    return True


def attempt_failure(session: Session, job_id: str, attempt: int) -> dict | None:
    """How `attempt` failed ({"step", "error"}), as its failure event recorded it; None if it did not."""
    if attempt < 1:
        return None
    events = session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.attempt == attempt, JobEvent.level == "error")
    )
    failures = [e.data["failure"] for e in events if e.data and "failure" in e.data]
    return failures[-1] if failures else None


def is_current(session: Session, job_id: str, attempt: int) -> bool:
    """Whether `attempt` still owns the job. The row stays locked until this transaction ends, so a reaper's
    requeue cannot slip in between this check and the write it guards."""
    row = session.execute(select(Job.status, Job.attempt).where(Job.id == job_id).with_for_update()).one_or_none()
    return row is not None and row.status == state.RUNNING and row.attempt == attempt


@dataclass
class ControlFlags:
    stop: bool  # cancelled, or this attempt is no longer the job's
    pause: bool


def control_flags(session: Session, job_id: str, attempt: int) -> ControlFlags:
    row = session.execute(
        select(Job.status, Job.attempt, Job.cancel_requested, Job.pause_requested).where(Job.id == job_id)
    ).one_or_none()
    if row is None or row.status != state.RUNNING or row.attempt != attempt:
        return ControlFlags(stop=True, pause=False)
    return ControlFlags(stop=row.cancel_requested, pause=row.pause_requested)


def pause_job(session: Session, job_id: str, attempt: int, *, step: int, resume_key: str, resume_sha256: str) -> bool:
    """`resume_key` names the saved state, already recorded as a resumable checkpoint (its bytes count there);
    retention keeps that object while the job is paused or queued, and collects it once superseded."""
    return state.transition(
        session,
        job_id,
        state.PAUSED,
        expect={state.RUNNING},
        fenced_attempt=attempt,
        message=f"Fine-tuning job paused at step {step}; resume continues from there",
        pause_requested=False,
        lease_expires_at=None,
        resume_key=resume_key,
        resume_sha256=resume_sha256,
        estimated_finish=None,
    )


def add_event(
    session: Session,
    job_id: str,
    attempt: int,
    message: str,
    *,
    type: str = "message",
    level: str = "info",
    data: dict | None = None,
) -> bool:
    if not is_current(session, job_id, attempt):
        return False
    session.add(
        JobEvent(job_id=job_id, attempt=attempt, created_at=now(), level=level, type=type, message=message, data=data)
    )
    session.flush()
    return True


def record_metrics(session: Session, job_id: str, attempt: int, metrics: dict) -> bool:
    """A metrics event plus the job's live progress and estimated finish."""
    eta = metrics.get("eta_seconds")
    changed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempt == attempt, Job.status == state.RUNNING)
        .values(
            progress=metrics,
            estimated_finish=now() + int(eta) if eta is not None else None,
            updated_at=now(),
        )
    ).rowcount  # type: ignore[attr-defined]
    if not changed:
        return False
    message = f"Step {metrics['step']}/{metrics['total_steps']}: training loss={metrics['train_loss']:.4f}"
    return add_event(session, job_id, attempt, message, type="metrics", data=metrics)


def record_checkpoint(
    session: Session,
    job_id: str,
    attempt: int,
    *,
    step: int,
    metrics: dict,
    storage_key: str,
    sha256: str,
    size: int | None = None,
    resumable: bool = False,
) -> Checkpoint | None:
    """`size`: the stored object's bytes, which count in the tenant's storage quota."""
    if not is_current(session, job_id, attempt):
        return None
    checkpoint = Checkpoint(
        id=new_id("ftckpt"),
        job_id=job_id,
        attempt=attempt,
        step=step,
        metrics=metrics,
        storage_key=storage_key,
        sha256=sha256,
        bytes=size,
        resumable=resumable,
        created_at=now(),
    )
    session.add(checkpoint)
    add_event(session, job_id, attempt, f"Checkpoint saved at step {step}", data={"step": step})
    return checkpoint


def succeed_job(session: Session, job_id: str, attempt: int, **values) -> bool:
    """`values` are the job's delivered fields (`adapter_key`, `adapter_sha256`, `adapter_bytes`, …)."""
    return state.transition(session, job_id, state.SUCCEEDED, expect={state.RUNNING}, fenced_attempt=attempt, **values)


def fail_job(
    session: Session, job_id: str, attempt: int | None, code: str, message: str, param: str | None = None
) -> bool:
    return state.transition(
        session,
        job_id,
        state.FAILED,
        fenced_attempt=attempt,
        message=f"The job has failed: {message}",
        error={"code": code, "message": message, "param": param},
    )


def cancel_running_job(session: Session, job_id: str, attempt: int) -> bool:
    return state.transition(session, job_id, state.CANCELLED, expect={state.RUNNING}, fenced_attempt=attempt)
