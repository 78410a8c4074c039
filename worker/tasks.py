"""Celery tasks. Thin: they take a job id, re-check the row, call a service or the runner, record the result."""

import logging
import os
import socket

from sqlalchemy import update

from shared.basemodels.models import BaseModelRecord
from shared.db import after_commit, retrying, session_scope
from shared.files.models import File
from shared.ids import now
from shared.jobs import execution, state
from shared.jobs.datacheck import check_job_data
from shared.jobs.models import Job
from shared.queue import TRAIN_TASK, VALIDATE_TASK, get_celery, publish
from shared.settings import get_settings
from shared.storage import StorageError, get_storage
from worker.runner import JobRunner, RecipeFailed, RetryAttempt

log = logging.getLogger("tunequeue.worker")
app = get_celery()
RUNNING_JOBS: set[str] = set()  # reported in this worker's heartbeat


def worker_name() -> str:
    """Unique per worker process, so that two workers on one node are told apart in leases and events."""
    return f"{socket.gethostname()}:{os.getpid()}"


@app.task(name=VALIDATE_TASK)
def validate(job_id: str) -> None:
    """validating_files → queued (and publish training), or failed with the report."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or job.status != state.VALIDATING:
            return
        job.updated_at = now()  # taken: the sweeper measures "no message for this job" from here
        base = session.get(BaseModelRecord, job.model)
        training = session.get(File, job.training_file)
        validation = session.get(File, job.validation_file) if job.validation_file else None
        options = dict(job.training_options)
    if base is None or training is None or training.deleted or (validation is not None and validation.deleted):
        _fail_validation(job_id, "invalid_training_file", "a file or the base model of this job was deleted", None)
        return
    try:
        check = check_job_data(
            get_storage(),
            get_settings(),
            base,
            training,
            validation,
            max_seq_length=options["max_seq_length"],
            train_on_inputs=options.get("train_on_inputs", False),
        )
    except Exception as exc:  # a broken tokenizer or template is reported, not left validating
        log.exception("validation of %s failed", job_id)
        _fail_validation(job_id, "validation_error", f"{type(exc).__name__}: {exc}", None)
        return
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(validation_report=check.report))
        if not check.ok:
            execution.fail_job(session, job_id, None, "invalid_training_file", check.message(), check.param)
        elif state.transition(session, job_id, state.QUEUED, expect={state.VALIDATING}):
            after_commit(session, lambda: publish(TRAIN_TASK, job_id))


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
        attempt = execution.claim_job(
            session, job_id, worker_name(), settings.lease_seconds, settings.max_running_jobs_per_tenant
        )
    if attempt is None:
        log.info("job %s not claimable (already taken, finished or cancelled); acking", job_id)
        return
    RUNNING_JOBS.add(job_id)
    try:
        JobRunner(job_id, attempt, worker_name()).run()
    except RecipeFailed as exc:
        _fail(job_id, attempt, exc.code, str(exc), exc.param)
    except RetryAttempt as exc:
        _requeue(job_id, attempt, str(exc), exc.code)
    except StorageError as exc:
        log.exception("job %s: storage failed", job_id)
        _requeue(job_id, attempt, f"Attempt {attempt}: object storage failed: {exc}", "storage_error")
    except BaseException as exc:  # never leave a job in `running`
        log.exception("job %s failed", job_id)
        _requeue(job_id, attempt, f"Attempt {attempt}: {type(exc).__name__}: {exc}", "internal_error")
        if not isinstance(exc, Exception):
            raise
    finally:
        RUNNING_JOBS.discard(job_id)


def _fail(job_id: str, attempt: int, code: str, message: str, param: str | None) -> None:
    retrying(lambda session: execution.fail_job(session, job_id, attempt, code, message, param), f"failing {job_id}")


def _requeue(job_id: str, attempt: int, reason: str, code: str) -> None:
    def requeue(session) -> None:
        outcome = execution.requeue_job(
            session, job_id, attempt, reason, max_attempts=get_settings().max_attempts, code=code
        )
        if outcome == state.QUEUED:
            after_commit(session, lambda: publish(TRAIN_TASK, job_id))

    retrying(requeue, f"requeueing {job_id}")
