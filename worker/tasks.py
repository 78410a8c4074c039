"""Celery tasks. Thin: they take a job id, re-check the row, call a service or the runner, record the result."""

import logging
import socket

from shared.datasets.validation import validate_chat_jsonl
from shared.db import session_scope
from shared.files.models import File
from shared.jobs import execution, state
from shared.jobs.models import Job
from shared.queue import TRAIN_TASK, VALIDATE_TASK, get_celery, publish
from shared.storage import get_storage
from worker.runner import JobRunner, RecipeFailed

log = logging.getLogger("tunequeue.worker")
app = get_celery()
RUNNING_JOBS: set[str] = set()  # reported in this worker's heartbeat


def worker_name() -> str:
    return f"{socket.gethostname()}"


@app.task(name=VALIDATE_TASK)
def validate(job_id: str) -> None:
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or job.status != state.VALIDATING:
            return
        training = session.get(File, job.training_file)
        key = training.storage_key if training and not training.deleted else None
    if key is None:
        _fail_validation(job_id, "invalid_training_file", "the training file was deleted", "training_file")
        return
    report = validate_chat_jsonl(get_storage().get_bytes(key))
    if not report.ok:
        _fail_validation(job_id, "invalid_training_file", report.summary(), "training_file")
        return
    with session_scope() as session:
        if state.transition(session, job_id, state.QUEUED, expect={state.VALIDATING}):
            from shared.db import after_commit

            after_commit(session, lambda: publish(TRAIN_TASK, job_id))


def _fail_validation(job_id: str, code: str, message: str, param: str) -> None:
    with session_scope() as session:
        execution.fail_job(session, job_id, None, code, message, param)


@app.task(name=TRAIN_TASK)
def train(job_id: str) -> None:
    with session_scope() as session:
        attempt = execution.claim_job(session, job_id, worker_name())
    if attempt is None:
        log.info("job %s not claimable (already taken, finished or cancelled); acking", job_id)
        return
    RUNNING_JOBS.add(job_id)
    try:
        JobRunner(job_id, attempt, worker_name()).run()
    except RecipeFailed as exc:
        _fail(job_id, attempt, exc.code, str(exc), exc.param)
    except BaseException as exc:  # never leave a job in `running`
        log.exception("job %s failed", job_id)
        _fail(job_id, attempt, "internal_error", f"{type(exc).__name__}: {exc}", None)
        if not isinstance(exc, Exception):
            raise
    finally:
        RUNNING_JOBS.discard(job_id)


def _fail(job_id: str, attempt: int, code: str, message: str, param: str | None) -> None:
    with session_scope() as session:
        execution.fail_job(session, job_id, attempt, code, message, param)
