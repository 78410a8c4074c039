"""The sweeper: what makes "accepted" mean "will finish". Every worker runs it every `sweep_seconds`; it is
safe to run in several places at once because each of its writes is a conditional UPDATE.

1. Jobs `running` past their lease (the worker died, froze or lost the database) are requeued for another
   attempt, which resumes from the newest verified checkpoint; after `max_attempts` they fail `worker_lost`.
2. Jobs `validating_files` or `queued` with no message for them in the broker (the broker lost it, or the
   API died between commit and publish) are published again, unless a worker holds a live validation lease
   on the job (it is validating right now). A duplicate message is harmless: the claim lets exactly one
   attempt (or one validation) through.
3. Checkpoints that retention no longer keeps (`shared.jobs.retention`) are collected, a bounded batch per
   sweep. A requeued attempt's objects that no row records (uploaded just before its worker died) are deleted.
"""

import functools
import logging
from dataclasses import dataclass, field

from sqlalchemy import and_, or_, select, update

from shared.db import after_commit, session_scope
from shared.ids import now
from shared.jobs import execution, state
from shared.jobs.dispatch import dispatch_training
from shared.jobs.models import Job, JobEvent
from shared.jobs.retention import collect_checkpoints, discard_unrecorded
from shared.jobs.status import JobStatus
from shared.queue import TRAIN_TASK, VALIDATE_TASK, publish, waiting_messages
from shared.settings import Settings, get_settings
from shared.storage import get_storage

log = logging.getLogger("tunequeue.sweeper")


@dataclass
class SweepReport:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    republished: list[str] = field(default_factory=list)
    collected_checkpoints: list[str] = field(default_factory=list)


def sweep(settings: Settings | None = None) -> SweepReport:
    settings = settings or get_settings()
    report = SweepReport()
    reap_expired_leases(settings, report)
    republish_lost_messages(settings, report)
    report.collected_checkpoints = collect_checkpoints(get_storage(), settings.keep_checkpoints)
    return report


def reap_expired_leases(settings: Settings, report: SweepReport) -> None:
    timestamp = now()
    with session_scope() as session:
        expired = session.execute(
            select(Job.id, Job.attempt, Job.worker).where(
                Job.status == JobStatus.RUNNING,
                or_(
                    Job.lease_expires_at < timestamp,
                    # a job claimed before leases existed: its updated_at stands in
                    and_(Job.lease_expires_at.is_(None), Job.updated_at < timestamp - settings.lease_seconds),
                ),
            )
        ).all()
    for job_id, attempt, worker in expired:
        # Tenants read this in the job's events: which worker (host and pid) is for the operator's log only.
        reason = f"Attempt {attempt} lost: its worker stopped renewing its lease (worker lost)"
        with session_scope() as session:
            outcome = execution.requeue_job(session, job_id, attempt, reason, max_attempts=settings.max_attempts)
            if outcome == JobStatus.QUEUED:
                after_commit(session, functools.partial(dispatch_training, job_id))
        if outcome == JobStatus.QUEUED:
            report.requeued.append(job_id)
        elif outcome == JobStatus.FAILED:
            report.failed.append(job_id)
        if outcome:
            log.warning("%s: attempt %s: worker %s stopped renewing its lease → %s", job_id, attempt, worker, outcome)
            # what the lost worker had uploaded but not yet recorded when it stopped
            discard_unrecorded(get_storage(), job_id, attempt)


def republish(task: str, job_id: str):
    if task == TRAIN_TASK:
        return functools.partial(dispatch_training, job_id)
    return functools.partial(publish, task, job_id)


def republish_lost_messages(settings: Settings, report: SweepReport) -> None:
    timestamp = now()
    cutoff = timestamp - settings.republish_after_seconds
    with session_scope() as session:
        stale = session.execute(
            select(Job.id, Job.status, Job.updated_at, Job.cancel_requested).where(
                Job.status.in_((JobStatus.VALIDATING, JobStatus.QUEUED)),
                Job.updated_at < cutoff,
                # a worker is validating it (its lease is live): its message was taken, not lost
                or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < timestamp),
            )
        ).all()
    if not stale:
        return
    waiting = waiting_messages()
    if waiting is None:
        log.warning("this broker cannot be inspected; jobs whose message is lost are not republished")
        return
    for job_id, status, updated_at, cancel_requested in stale:
        if cancel_requested:  # cancelled while its worker died: finish the cancel instead
            with session_scope() as session:
                state.transition(session, job_id, JobStatus.CANCELLED, expect={status})
            continue
        task = VALIDATE_TASK if status == JobStatus.VALIDATING else TRAIN_TASK
        if (task, job_id) in waiting:
            continue
        with session_scope() as session:
            # Only one sweeper wins this row; the others see updated_at moved and leave it.
            won = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == status, Job.updated_at == updated_at)
                .values(updated_at=now())
            ).rowcount  # type: ignore[attr-defined]
            if not won:
                continue
            session.add(
                JobEvent(
                    job_id=job_id,
                    created_at=now(),
                    level="warn",
                    message="No message for this job was waiting in the broker; it was published again",
                )
            )
            after_commit(session, republish(task, job_id))
        report.republished.append(job_id)
        log.warning("%s (%s) had no message in the broker; republished", job_id, status)
