"""Celery tasks. Thin: they take a job id, re-check the row, call a service or the runner, record the result."""

import logging
import os
import socket
import time
from collections.abc import Callable
from functools import partial

from sqlalchemy import or_, update
from sqlalchemy.orm import Session

from shared.basemodels.models import BaseModelRecord
from shared.db import after_commit, retrying, session_scope
from shared.exports import service as exports
from shared.files.models import File
from shared.ids import now
from shared.jobs import evaluations, execution, memory, state
from shared.jobs.datacheck import check_job_data
from shared.jobs.dispatch import dispatch_training
from shared.jobs.models import Job
from shared.jobs.retention import discard_unrecorded
from shared.queue import (
    EVALUATE_TASK,
    EXPORT_TASK,
    TRAIN_TASK,
    VALIDATE_TASK,
    get_celery,
    publish_evaluation,
    publish_export,
)
from shared.settings import get_settings
from shared.storage import StorageError, get_storage
from shared.workers import service as workers
from worker.runner import JobRunner, RecipeFailed, RetryAttempt
from worker.runner.evaluation import run_evaluation
from worker.runner.export import run_export
from worker.runner.lease import ClaimRenewal
from worker.slots import Lease, Slots

log = logging.getLogger("tunequeue.worker")
app = get_celery()
RUNNING_JOBS: set[str] = set()  # reported in this worker's heartbeat


def worker_name() -> str:
    """Unique per worker process, so that two workers on one node are told apart in leases and events."""
    return f"{socket.gethostname()}:{os.getpid()}"


@app.task(name=VALIDATE_TASK)
def validate(job_id: str) -> None:
    """validating_files → queued (and publish training), or failed with the report. The job is claimed first
    (`claim_validation`): a redelivered or republished message finds it claimed and is acked, so that data is
    checked once however many messages there are."""
    settings = get_settings()
    worker = worker_name()
    with session_scope() as session:
        if not claim_validation(session, job_id, worker, settings.lease_seconds):
            log.info("job %s is not validating or another worker is validating it; acking", job_id)
            return
        job = session.get(Job, job_id)
        assert job is not None  # just claimed
        base = session.get(BaseModelRecord, job.model)
        training = session.get(File, job.training_file)
        validation = session.get(File, job.validation_file) if job.validation_file else None
        options = dict(job.training_options)
    if base is None or training is None or training.deleted or (validation is not None and validation.deleted):
        _fail_validation(job_id, "invalid_training_file", "a file or the base model of this job was deleted", None)
        return
    try:
        renewal = partial(renew_validation, job_id=job_id, worker=worker, lease_seconds=settings.lease_seconds)
        with ClaimRenewal(f"validation of {job_id}", renewal, settings.lease_seconds):
            check = check_job_data(
                get_storage(),
                settings,
                base,
                training,
                validation,
                max_seq_length=options["max_seq_length"],
                train_on_inputs=options.get("train_on_inputs", False),
            )
    except Exception as exc:  # a broken tokenizer or template is reported, not left validating
        log.exception("validation of %s failed", job_id)
        # A tokenizer's or template's own words help the user; a storage error's (bucket, endpoint) are the admins'.
        reason = exc.public if isinstance(exc, StorageError) else f"{type(exc).__name__}: {exc}"
        _fail_validation(job_id, "validation_error", reason, None)
        return
    with session_scope() as session:
        refusal = None
        if check.ok:  # the peak memory the job would take, on the largest slot a worker offers
            try:
                check.report["memory"], refusal = memory.job_plan(session, get_storage(), settings, base, options,
                                                                  check.report)  # fmt: skip
            except Exception:  # an estimate that cannot be made refuses nothing: the recipe checks again
                log.exception("no memory estimate for %s", job_id)
        # Leaving validating_files (either way) clears the lease.
        session.execute(update(Job).where(Job.id == job_id).values(validation_report=check.report))
        if not check.ok:
            execution.fail_job(session, job_id, None, "invalid_training_file", check.message(), check.param)
        elif refusal is not None:
            execution.fail_job(session, job_id, None, "insufficient_memory", *refusal)
        elif state.transition(session, job_id, state.QUEUED, expect={state.VALIDATING}):
            after_commit(session, lambda: dispatch_training(job_id))


def claim_validation(session: Session, job_id: str, worker: str, lease_seconds: float) -> bool:
    """A conditional UPDATE: the job is validating and nobody holds a live validation lease on it. Of any
    duplicate messages, one wins; a lease left by a worker that died expires and the job can be taken again."""
    timestamp = now()
    claimed = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.status == state.VALIDATING,
            or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < timestamp),
        )
        .values(worker=worker, lease_expires_at=timestamp + int(lease_seconds), updated_at=timestamp)
        .execution_options(synchronize_session=False)
    )
    return claimed.rowcount == 1  # type: ignore[attr-defined]


def renew_validation(session: Session, *, job_id: str, worker: str, lease_seconds: float) -> None:
    """The validation claim, renewed while the data is checked (a long line or a slow tokenizer download would
    otherwise outlast it), until the job leaves validating_files."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == state.VALIDATING, Job.worker == worker)
        .values(lease_expires_at=now() + int(lease_seconds), updated_at=now())
    )


def _fail_validation(job_id: str, code: str, message: str, param: str | None) -> None:
    with session_scope() as session:
        execution.fail_job(session, job_id, None, code, message, param)


@app.task(name=TRAIN_TASK)
def train(job_id: str) -> None:
    """Claim the job (a conditional UPDATE: of any duplicate messages, one wins) and run it. However the
    attempt ends, the job leaves `running` here: succeeded, paused, cancelled, failed for a reason that is the
    job's own, or requeued for another attempt when the cause was not (bounded by TUNEQUEUE_MAX_ATTEMPTS)."""
    settings = get_settings()
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or job.status != state.QUEUED:
            log.info("job %s is not queued (%s); acking", job_id, job.status if job else "gone")
            return
        devices, priority = job.devices, job.priority
        behind = execution.tenant_to_serve_first(session, job, get_slots().total, settings.max_running_jobs_per_tenant)
    if behind is not None:
        # Round-robin between tenants within a priority: another tenant is owed a turn, so this job goes back
        # to the end of its queue and the broker hands out the next message.
        log.info("job %s of %s yields to tenant %s (fair share); republishing", job_id, job.tenant, behind)
        time.sleep(0.2)  # if the other tenant's job is in flight elsewhere, do not spin on the broker
        dispatch_training(job_id)
        return
    slots = get_slots()
    if devices > slots.total:  # routing keeps this from happening; if it does, leave it to a bigger worker
        log.error("job %s needs %d devices, this worker has %d; republishing", job_id, devices, slots.total)
        dispatch_training(job_id)
        return
    lease = slots.acquire(devices, priority, timeout=settings.slot_wait_seconds)
    if lease is None:
        # No slot here soon enough: back to the broker at its priority, where a worker with a free slot (or
        # this one, later) takes it. Waiting longer here would hold the job out of the queue's order.
        dispatch_training(job_id)
        return
    usage: list[int] = []
    try:
        with session_scope() as session:
            attempt = execution.claim_job(
                session, job_id, worker_name(), settings.lease_seconds, settings.max_running_jobs_per_tenant
            )
        if attempt is None:
            log.info("job %s not claimable (already taken, finished or cancelled); acking", job_id)
            return
        with session_scope() as session:
            usage = workers.start_device_usage(session, worker_name(), lease.names, job_id, attempt)
        RUNNING_JOBS.add(job_id)
        run_attempt(job_id, attempt, lease)
    finally:
        RUNNING_JOBS.discard(job_id)
        if usage:
            retrying(lambda session: workers.end_device_usage(session, usage), f"recording device release of {job_id}")
        slots.release(lease)


@app.task(name=EVALUATE_TASK)
def evaluate(job_id: str) -> None:
    """An evaluation asked for on demand (`shared.jobs.evaluations`)."""
    with session_scope() as session:
        job = session.get(Job, job_id) if evaluations.evaluation_wanted(session, job_id) else None
        priority = job.priority if job is not None else None
    on_one_slot(
        f"evaluation of {job_id}",
        priority,
        lambda: publish_evaluation(job_id, priority or 0),
        lambda session, seconds: evaluations.claim_evaluation(session, job_id, seconds) is not None,
        lambda lease: run_evaluation(job_id, lease),
    )


@app.task(name=EXPORT_TASK)
def export(export_id: str) -> None:
    """An export of a job's model (`shared.exports.service`)."""
    priority = None
    with session_scope() as session:
        wanted = exports.export_wanted(session, export_id)
        if wanted is not None:
            job = session.get(Job, wanted.job_id)
            priority = job.priority if job is not None else 0
    on_one_slot(
        f"export {export_id}",
        priority,
        lambda: publish_export(export_id, priority or 0),
        lambda session, seconds: exports.claim_export(session, export_id, seconds),
        lambda lease: run_export(export_id, lease),
    )


def on_one_slot(
    what: str,
    priority: int | None,
    republish: Callable[[], None],
    claim: Callable[[Session, float], bool],
    run: Callable[[Lease], None],
) -> None:
    """Work beside the jobs (an evaluation, an export) on one slot, like a one-device job of its priority (None:
    the work is made or being made, and its message is acked without taking a slot). No slot soon enough: back
    to the broker. Claimed (a conditional UPDATE, so a duplicate message does nothing) once the slot is held."""
    if priority is None:
        log.info("%s is not queued (made, failed, or another worker holds it); acking", what)
        return
    settings = get_settings()
    slots = get_slots()
    lease = slots.acquire(1, priority, timeout=settings.slot_wait_seconds)
    if lease is None:
        republish()
        return
    try:
        with session_scope() as session:
            claimed = claim(session, settings.lease_seconds)
        if claimed:
            run(lease)
    finally:
        slots.release(lease)


def run_attempt(job_id: str, attempt: int, lease: Lease) -> None:
    try:
        JobRunner(job_id, attempt, worker_name(), lease).run()
    except RecipeFailed as exc:
        _fail(job_id, attempt, exc.code, str(exc), exc.param)
    except RetryAttempt as exc:
        _requeue(job_id, attempt, str(exc), exc.code)
    except StorageError as exc:
        log.exception("job %s: storage failed", job_id)  # the details (endpoint, bucket, key) stay in the log
        _requeue(job_id, attempt, f"Attempt {attempt}: {exc.public}", "storage_error")
    except BaseException as exc:  # never leave a job in `running`
        log.exception("job %s failed", job_id)
        _requeue(job_id, attempt, f"Attempt {attempt}: internal error on its worker", "internal_error")
        if not isinstance(exc, Exception):
            raise


_SLOTS: Slots | None = None


def get_slots() -> Slots:
    global _SLOTS
    if _SLOTS is None:
        _SLOTS = Slots.from_env()
    return _SLOTS


def _fail(job_id: str, attempt: int, code: str, message: str, param: str | None) -> None:
    retrying(lambda session: execution.fail_job(session, job_id, attempt, code, message, param), f"failing {job_id}")
    discard_unrecorded(get_storage(), job_id, attempt)


def _requeue(job_id: str, attempt: int, reason: str, code: str) -> None:
    def requeue(session) -> None:
        outcome = execution.requeue_job(
            session, job_id, attempt, reason, max_attempts=get_settings().max_attempts, code=code
        )
        if outcome == state.QUEUED:
            after_commit(session, lambda: dispatch_training(job_id))

    retrying(requeue, f"requeueing {job_id}")
    # a checkpoint whose upload or record the failure interrupted
    discard_unrecorded(get_storage(), job_id, attempt)
