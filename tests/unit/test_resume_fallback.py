"""Resume falls back past checkpoints whose stored bytes fail verification, on a real (SQLite) database and
the local object store: the newest that verifies is used, the others are marked unusable, and with none left
the attempt starts from the beginning, saying which it tried."""

import hashlib
import io
import json
import zipfile

from sqlalchemy import select

from shared.ids import new_id, now
from shared.jobs import state
from shared.jobs.models import Checkpoint, Job, JobEvent
from tests.support import embedded_in_process

JOB = "ftjob-fallback"


def checkpoint_zip(step: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("metrics_rows.json", json.dumps([{"step": s} for s in range(1, step + 3)]))
        archive.writestr("state.pt", f"state at {step}")
    return buffer.getvalue()


def running_job(corrupt: dict[int, bool]) -> list:
    """Attempt 2 of a running job, with a resumable checkpoint per step; a corrupt one's stored bytes were
    changed after its sha256 was recorded. Returns the runner's candidates, newest first."""
    from shared.db import session_scope
    from shared.jobs import execution
    from shared.storage import get_storage
    from worker.runner import ResumeCandidate

    storage = get_storage()
    with session_scope() as session:
        session.add(
            Job(
                id=JOB, tenant="t", status=state.RUNNING, attempt=2, model="m", training_file="file-1", seed=1,
                hyperparameters={}, training_options={}, result_files=[], created_at=now(), updated_at=now(),
                cancel_requested=False, lease_expires_at=now() + 600,
            )
        )  # fmt: skip
        session.flush()
        for step, is_corrupt in corrupt.items():
            data, key = checkpoint_zip(step), f"tenants/t/jobs/{JOB}/attempt-1/checkpoints/step-{step}.zip"
            storage.put_bytes(key, b"bit rot" + data[7:] if is_corrupt else data)
            session.add(
                Checkpoint(
                    id=new_id("ftckpt"), job_id=JOB, attempt=1, step=step, metrics={}, storage_key=key,
                    sha256=hashlib.sha256(data).hexdigest(), resumable=True, created_at=now(),
                )
            )  # fmt: skip
    with session_scope() as session:
        return [
            ResumeCandidate(c.id, c.storage_key, c.sha256, c.step)
            for c in execution.resumable_checkpoints(session, JOB)
        ]


def outcome() -> tuple[list[int], list[str]]:
    from shared.db import session_scope

    with session_scope() as session:
        usable = session.scalars(
            select(Checkpoint.step).where(Checkpoint.resumable.is_(True)).order_by(Checkpoint.step)
        )
        events = session.scalars(select(JobEvent.message).where(JobEvent.job_id == JOB).order_by(JobEvent.seq))
        return list(usable), list(events)


def runner():
    from worker.runner import JobRunner

    job_runner = JobRunner(JOB, 2, "test-worker")
    job_runner.tenant = "t"
    return job_runner


def test_the_newest_checkpoint_that_verifies_is_resumed(tmp_path, monkeypatch):
    embedded_in_process(monkeypatch, tmp_path / "data")
    candidates = running_job({2: False, 4: False, 6: True})
    job_runner = runner()
    folder = job_runner.fetch_resume_state(tmp_path, candidates)

    assert folder is not None and (folder / "state.pt").read_text() == "state at 4"
    assert [row["step"] for row in job_runner.metrics_rows] == [1, 2, 3, 4]  # none past the checkpoint
    usable, events = outcome()
    assert usable == [2, 4]  # step 6 is never tried again
    assert "The checkpoint at step 6 failed verification" in events[0] and "marked unusable" in events[0]
    assert events[1] == "Resuming from the checkpoint at step 4 (sha256 verified)"


def test_with_none_verifying_the_attempt_starts_from_the_beginning(tmp_path, monkeypatch):
    embedded_in_process(monkeypatch, tmp_path / "data")
    candidates = running_job({2: True, 4: True})
    from shared.storage import get_storage

    get_storage().delete(candidates[1].key)  # and one is gone altogether
    assert runner().fetch_resume_state(tmp_path, candidates) is None

    usable, events = outcome()
    assert usable == []
    assert "step 4 failed verification" in events[0] and "step 2 is missing" in events[1]
    assert events[2] == "No checkpoint verified (tried step 4, step 2): training starts from the beginning"
