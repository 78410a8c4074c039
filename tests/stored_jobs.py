"""Jobs, checkpoints and files built straight in the database, each with a small object in storage: what the
quota and retention tests need without training a model. Call after the settings point at a migrated
database (`embedded_in_process`, or the production environment)."""

import hashlib

from shared.ids import new_id, now
from shared.jobs import state
from shared.jobs.models import Checkpoint, Job


def job_prefix(tenant: str, job_id: str) -> str:
    return f"tenants/{tenant}/jobs/{job_id}/"


def add_job(tenant: str, status: str = state.SUCCEEDED, attempt: int = 1, **fields) -> str:
    from shared.db import session_scope

    job_id = new_id("ftjob")
    succeeded = status == state.SUCCEEDED
    with session_scope() as session:
        session.add(
            Job(
                id=job_id, tenant=tenant, status=status, attempt=attempt, model="tiny-llama", training_file="file-x",
                seed=1, hyperparameters={}, training_options={}, result_files=[], cancel_requested=False,
                fine_tuned_model=f"ft:tiny-llama::{job_id}" if succeeded else None,
                lease_expires_at=now() + 600 if status == state.RUNNING else None,
                created_at=now(), updated_at=now(), **fields,
            )
        )  # fmt: skip
    return job_id


def add_checkpoint(
    job_id: str, step: int, *, attempt: int = 1, name: str = "step", size: int = 100, resumable: bool = True
) -> str:
    """A stored checkpoint (its object, its completion marker, its row with `size` bytes); returns its key."""
    from shared.db import session_scope
    from shared.storage import get_storage

    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        key = f"{job_prefix(job.tenant, job_id)}attempt-{attempt}/checkpoints/{name}-{step}.zip"
        data = bytes([step % 256]) * size
        get_storage().put_bytes(key, data)
        get_storage().put_bytes(f"{key}.complete", b"{}")
        session.add(
            Checkpoint(
                id=new_id("ftckpt"), job_id=job_id, attempt=attempt, step=step, metrics={}, storage_key=key,
                sha256=hashlib.sha256(data).hexdigest(), bytes=size, resumable=resumable, created_at=now(),
            )
        )  # fmt: skip
    return key


def deliver_adapter(job_id: str, step: int, size: int = 1000) -> str:
    """The job's delivered adapter, as promotion records it: the object, `adapter_*` on the job and a
    (non-resumable) checkpoint row naming the same object. Returns its key."""
    from shared.db import session_scope
    from shared.storage import get_storage

    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        key = f"{job_prefix(job.tenant, job_id)}attempt-{job.attempt}/adapter.zip"
        data = b"A" * size
        get_storage().put_bytes(key, data)
        sha256 = hashlib.sha256(data).hexdigest()
        job.adapter_key, job.adapter_sha256, job.adapter_bytes = key, sha256, size
        session.add(
            Checkpoint(
                id=new_id("ftckpt"), job_id=job_id, attempt=job.attempt, step=step, metrics={}, storage_key=key,
                sha256=sha256, bytes=size, resumable=False, created_at=now(),
            )
        )  # fmt: skip
    return key
