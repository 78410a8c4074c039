"""A job's data is checked once however many validate messages arrive: the task claims the job (a lease on
the validating row) and a redelivered message finds it taken; the sweeper leaves a job that is being
validated alone. In this process on the embedded defaults (SQLite, the SQLAlchemy broker, local storage)."""

import io
import json
import threading
import time

from sqlalchemy import func, select, update

from tests.support import embedded_in_process


def long_chats(lines: int, messages: int) -> bytes:
    def line(number: int) -> dict:
        roles = ["user", "assistant"] * (messages // 2)
        return {"messages": [{"role": r, "content": f"{r} {number}.{i}"} for i, r in enumerate(roles)]}

    return "".join(json.dumps(line(number)) + "\n" for number in range(lines)).encode()


def create_job(data: bytes) -> str:
    from shared.db import session_scope
    from shared.files.service import create_file
    from shared.jobs.schemas import JobCreate
    from shared.jobs.service import create_job as create
    from shared.storage import get_storage

    with session_scope() as session:
        file = create_file(
            session,
            get_storage(),
            tenant="t",
            stream=io.BytesIO(data),
            filename="t.jsonl",
            purpose="fine-tune",
            max_bytes=1 << 30,
        )
        return create(session, "t", JobCreate(model="tiny-llama", training_file=file.id, max_seq_length=8192)).id


def job_row(job_id: str):
    from shared.db import session_scope
    from shared.jobs.models import Job

    with session_scope() as session:
        job = session.get(Job, job_id)
        session.expunge(job)
        return job


def validated_events(job_id: str) -> int:
    from shared.db import session_scope
    from shared.jobs.models import JobEvent

    with session_scope() as session:
        query = select(func.count()).where(JobEvent.job_id == job_id, JobEvent.message == "Files validated, job queued")
        return session.scalar(query)


def test_a_redelivered_validate_message_while_validating_is_acked_and_the_job_validated_once(
    tmp_path, monkeypatch, tiny_model
):
    embedded_in_process(monkeypatch, tmp_path / "data", tiny_model)
    from worker.tasks import validate

    job_id = create_job(long_chats(lines=150, messages=400))  # a few seconds of tokenizing
    first = threading.Thread(target=validate, args=(job_id,))
    first.start()
    deadline = time.monotonic() + 30
    while job_row(job_id).lease_expires_at is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job_row(job_id).worker, "the first delivery did not claim the job"
    started = time.monotonic()
    validate(job_id)  # the same message again, as after a broker redelivery or a sweeper's republish
    assert first.is_alive(), "the second delivery validated the data again instead of leaving it to the first"
    assert time.monotonic() - started < 2
    first.join(timeout=120)
    validate(job_id)  # and once more after the job has left validating_files
    job = job_row(job_id)
    assert job.status == "queued" and job.validation_report["examples"] == 150
    assert job.lease_expires_at is None
    assert validated_events(job_id) == 1


def test_the_sweeper_leaves_a_job_whose_validation_lease_is_live(tmp_path, monkeypatch, tiny_model):
    embedded_in_process(monkeypatch, tmp_path / "data", tiny_model, republish_after_seconds="0")
    from shared.db import session_scope
    from shared.ids import now
    from shared.jobs.models import Job
    from shared.jobs.recovery import SweepReport, republish_lost_messages
    from shared.queue import get_celery
    from shared.settings import get_settings
    from worker.tasks import claim_validation

    job_id = create_job(long_chats(lines=12, messages=2))
    get_celery().control.purge()  # the validate message was taken by a worker that is validating now
    with session_scope() as session:
        assert claim_validation(session, job_id, "busy-worker", 60)
        assert not claim_validation(session, job_id, "another-worker", 60)
        session.execute(update(Job).where(Job.id == job_id).values(updated_at=now() - 600))
    report = SweepReport()
    republish_lost_messages(get_settings(), report)
    assert report.republished == []
    with session_scope() as session:  # the worker died: its lease runs out, and the job is published again
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=now() - 1))
    republish_lost_messages(get_settings(), report)
    assert report.republished == [job_id]
