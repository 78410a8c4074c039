"""An evaluation made on demand, for a job that succeeded without one (it ran before every job was evaluated,
or its evaluation could not be made when it ended): `POST /v1/fine_tuning/jobs/{id}/evaluation` asks a training
worker to compute what the recipe computes at its end — both models' loss and token accuracy on the job's own
validation set (its validation file, or the same share of the training file held out by the job's seed), and
their greedy answers side by side (`worker.runner.evaluation`).

`jobs.evaluation_status` says where it stands: None (none was asked for: the recipe's own, or none), `queued`,
`running`, `succeeded` or `failed` (`evaluation_error` says why). Each step is a conditional UPDATE, so any
number of requests and messages make one evaluation:
- a request claims the job (`queued`, the claim held for REPUBLISH_SECONDS) and publishes one message; requests
  while it is queued or running are answered with its state; once the claim has passed with no worker on it
  (a message lost with the broker), the next request publishes again;
- a worker claims it (`running`, a lease it renews, as a running job's) before it starts; a duplicate message
  finds it claimed and is acked;
- a worker that dies leaves a lease that passes: the evaluation is then shown as failed, and a request starts
  it again."""

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from shared.db import after_commit
from shared.errors import NotFound
from shared.ids import now
from shared.jobs.errors import EvaluationNotFound, EvaluationNotReady
from shared.jobs.models import Job, JobEvent
from shared.jobs.status import JobStatus
from shared.queue import publish_evaluation

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
PENDING = (QUEUED, RUNNING)
REPUBLISH_SECONDS = 60  # a queued evaluation no worker has claimed by then is published again on request
WORKER_LOST = "the worker making it stopped before it finished; ask again to start it anew"


def shown_status(job: Job, at: int | None = None) -> str | None:
    """What the API shows: `queued`, `running`, `succeeded`, `failed`, or None (no evaluation, none asked for).
    A running evaluation whose worker's lease has passed is failed: nobody is making it any more."""
    status = job.evaluation_status
    if status == RUNNING and (job.evaluation_lease_expires_at or 0) < (at if at is not None else now()):
        return FAILED
    if status is None and job.evaluation is not None:
        return SUCCEEDED  # the recipe's own, made when the job ended
    return status


def shown_error(job: Job) -> str | None:
    if shown_status(job) != FAILED:
        return None
    return job.evaluation_error or WORKER_LOST


def has_result(job: Job) -> bool:
    """The job holds a finished evaluation, and no newer one is being made."""
    return job.evaluation is not None and job.evaluation_status not in PENDING


def request_evaluation(session: Session, tenant: str, job_id: str) -> Job:
    """Asks for the job's evaluation unless it has one or one is on its way (see the module). 409 for a job
    that has not succeeded, 404 for one whose model was deleted (its adapter with it)."""
    from shared.jobs.service import get_job

    job = get_job(session, tenant, job_id)
    if job.status != JobStatus.SUCCEEDED:
        raise EvaluationNotReady(job_id, job.status)
    if job.model_deleted_at is not None:
        raise NotFound(
            f"The adapter of {job_id} was deleted with its model {job.fine_tuned_model}: there is nothing to evaluate",
            param="job_id",
            code="model_deleted",
        )
    if has_result(job):
        return job
    timestamp = now()
    takeable = or_(
        Job.evaluation_status.is_(None),
        Job.evaluation_status == FAILED,
        and_(Job.evaluation_status.in_(PENDING), Job.evaluation_lease_expires_at < timestamp),
    )
    claimed = take(
        session, job_id, takeable, QUEUED, timestamp + REPUBLISH_SECONDS, evaluation_error=None, updated_at=timestamp
    )
    if claimed:
        record(session, job, "Evaluation against the base model requested")
        priority = job.priority
        after_commit(session, lambda: publish_evaluation(job_id, priority))
    session.flush()
    return get_job(session, tenant, job_id)


def finished_evaluation(session: Session, tenant: str, job_id: str) -> Job:
    """The tenant's job with a finished evaluation that has figures to show, or why it has none: 409 until the
    job has succeeded; 404 when it had no validation examples, or has no evaluation and none was asked for."""
    from shared.jobs.service import get_job

    job = get_job(session, tenant, job_id)
    if job.status != JobStatus.SUCCEEDED:
        raise EvaluationNotReady(job_id, job.status)
    evaluation = job.evaluation
    if evaluation is None:
        raise EvaluationNotFound(
            f"Job {job_id} has no evaluation (it succeeded before tunequeue evaluated every job, or its evaluation "
            f"could not be made when it ended): POST /v1/fine_tuning/jobs/{job_id}/evaluation to make one",
            "evaluation_not_found",
        )
    if evaluation.get("base") is None or evaluation.get("tuned") is None:
        raise EvaluationNotFound(
            f"Job {job_id} had no validation examples to evaluate on: give a validation_file, or a training file "
            "of at least 20 examples (5% of it, at most 200, is then held out)",
            "no_validation_examples",
        )
    return job


# The worker's side (`worker.tasks.evaluate`).


def evaluation_wanted(session: Session, job_id: str) -> bool:
    """A message worth taking a slot for: the evaluation is queued, or running under a lease that has passed."""
    row = session.execute(
        select(Job.evaluation_status, Job.evaluation_lease_expires_at).where(Job.id == job_id)
    ).one_or_none()
    if row is None:
        return False
    return row.evaluation_status == QUEUED or (
        row.evaluation_status == RUNNING and (row.evaluation_lease_expires_at or 0) < now()
    )


def claim_evaluation(session: Session, job_id: str, lease_seconds: float) -> Job | None:
    """The job, its evaluation now `running` under this worker's lease; None if another holds it, it is done,
    or the job's model was deleted meanwhile."""
    timestamp = now()
    takeable = or_(
        Job.evaluation_status == QUEUED,
        and_(Job.evaluation_status == RUNNING, Job.evaluation_lease_expires_at < timestamp),
    )
    if not take(session, job_id, takeable, RUNNING, timestamp + int(lease_seconds)):
        return None
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    record(session, job, "Evaluation against the base model started")
    return job


def take(session: Session, job_id: str, takeable, status: str, until: int, **values) -> bool:
    """One conditional UPDATE: the succeeded job's evaluation, in a state `takeable` allows, becomes `status`
    under a claim that lasts `until`."""
    taken = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.SUCCEEDED, Job.model_deleted_at.is_(None), takeable)
        .values(evaluation_status=status, evaluation_lease_expires_at=until, **values)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    return bool(taken)


def renew_evaluation(session: Session, job_id: str, lease_seconds: float) -> bool:
    renewed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.evaluation_status == RUNNING)
        .values(evaluation_lease_expires_at=now() + int(lease_seconds))
    ).rowcount  # type: ignore[attr-defined]
    return bool(renewed)


def store_evaluation(session: Session, job_id: str, evaluation: dict, result_file: str | None, summary: str) -> bool:
    """The evaluation, with its JSON among the job's result files; false if it is no longer running (the model
    was deleted meanwhile)."""
    job = session.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one_or_none()
    if job is None or job.evaluation_status != RUNNING or job.model_deleted_at is not None:
        return False
    job.evaluation = evaluation
    job.evaluation_status = SUCCEEDED
    job.evaluation_lease_expires_at = None
    job.evaluation_error = None
    if result_file is not None:
        job.result_files = [*job.result_files, result_file]
    record(session, job, summary)
    return True


def fail_evaluation(session: Session, job_id: str, reason: str) -> None:
    job = session.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one_or_none()
    if job is None or job.evaluation_status != RUNNING:
        return
    job.evaluation_status = FAILED
    job.evaluation_lease_expires_at = None
    job.evaluation_error = reason
    record(session, job, f"Evaluation failed: {reason}", level="error")


def record(session: Session, job: Job, message: str, level: str = "info") -> None:
    """An event in the job's log; the job has ended, so it is not fenced by an attempt."""
    session.add(JobEvent(job_id=job.id, attempt=job.attempt, created_at=now(), level=level, message=message))
