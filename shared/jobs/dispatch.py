"""Publishing a job's training task: to the queue of its device class, at its priority. Called after commit
(the job is durably `queued` first) and by the sweeper; a duplicate message is harmless (the claim)."""

from shared.db import session_scope
from shared.jobs.models import Job
from shared.queue import publish_training


def dispatch_training(job_id: str) -> None:
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None:
            return
        devices, priority = job.devices, job.priority
    publish_training(job_id, devices, priority)
