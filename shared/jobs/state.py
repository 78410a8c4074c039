"""The job state machine. Every status write goes through `transition`, a conditional UPDATE: it changes the
row only if the job is in a state the table allows (and, for worker writes, only if the attempt still
matches), so two racing writers cannot both win and a terminal state is final.

Side effects of a transition (webhook deliveries) are hooks in AFTER_TRANSITION, registered by each process's
composition root, so that the state machine depends on nothing that reacts to it."""

from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from shared.ids import now
from shared.jobs.models import Job, JobEvent
from shared.jobs.status import JobStatus

VALIDATING = JobStatus.VALIDATING
QUEUED = JobStatus.QUEUED
RUNNING = JobStatus.RUNNING
PAUSED = JobStatus.PAUSED
SUCCEEDED = JobStatus.SUCCEEDED
FAILED = JobStatus.FAILED
CANCELLED = JobStatus.CANCELLED

TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE = frozenset({VALIDATING, QUEUED, RUNNING, PAUSED})
ALL_STATUSES = tuple(JobStatus)

ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    VALIDATING: frozenset({QUEUED, FAILED, CANCELLED}),
    QUEUED: frozenset({RUNNING, FAILED, CANCELLED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELLED, PAUSED, QUEUED}),
    PAUSED: frozenset({QUEUED, FAILED, CANCELLED}),
}

# hook(session, tenant, job_id, status), run inside the transaction that wrote the status.
AfterTransition = Callable[[Session, str, str, JobStatus], None]
AFTER_TRANSITION: list[AfterTransition] = []


def after_transition(hook: AfterTransition) -> AfterTransition:
    """Register `hook` for every status a job enters (its creation included); registering twice is harmless,
    since an app or a worker may be composed more than once in one process."""
    if hook not in AFTER_TRANSITION:
        AFTER_TRANSITION.append(hook)
    return hook


def entered(session: Session, tenant: str, job_id: str, status: JobStatus) -> None:
    """Tell the hooks that a job entered `status`: called by `transition`, and by job creation."""
    for hook in AFTER_TRANSITION:
        hook(session, tenant, job_id, status)


def sources_of(target: JobStatus) -> set[JobStatus]:
    return {source for source, targets in ALLOWED.items() if target in targets}


def transition(
    session: Session,
    job_id: str,
    target: JobStatus,
    *,
    expect: AbstractSet[str] | None = None,
    fenced_attempt: int | None = None,
    message: str | None = None,
    **values: Any,
) -> bool:
    """Move a job to `target` if allowed; returns whether this call made the change."""
    sources = sources_of(target)
    if expect is not None:
        sources &= expect
    if not sources:
        raise ValueError(f"no allowed transition into {target!r} from {expect}")
    timestamp = now()
    statement = update(Job).where(Job.id == job_id, Job.status.in_(sources))
    if fenced_attempt is not None:
        statement = statement.where(Job.attempt == fenced_attempt)
    if target != RUNNING:
        values.setdefault("lease_expires_at", None)
    if target in TERMINAL:
        values.setdefault("finished_at", timestamp)
        values.setdefault("estimated_finish", None)
    result = session.execute(
        statement.values(status=target, updated_at=timestamp, **values).execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    current_attempt = session.get(Job, job_id, populate_existing=True)
    if current_attempt is not None:
        entered(session, current_attempt.tenant, job_id, target)
    session.add(
        JobEvent(
            job_id=job_id,
            attempt=current_attempt.attempt if current_attempt else 0,
            created_at=timestamp,
            level="error" if target == FAILED else "info",
            type="message",
            message=message or status_message(target),
            data={"status": target},
        )
    )
    session.flush()
    return True


def status_message(status: JobStatus) -> str:
    return {
        VALIDATING: "Validating training file",
        QUEUED: "Files validated, job queued",
        RUNNING: "Fine-tuning job started",
        PAUSED: "Fine-tuning job paused",
        SUCCEEDED: "The job has successfully completed",
        FAILED: "The job has failed",
        CANCELLED: "The job was cancelled",
    }[status]
