"""Checkpoint retention on Postgres and an S3-protocol store (moto), run through the sweeper: older checkpoints
are collected with their objects, what a job may still need is kept, and sweeping again, or in two places at
once, changes nothing more. Jobs and checkpoints are built in the database with small objects; nothing trains."""

import threading

import pytest
from sqlalchemy import select

from shared import db, queue, settings, storage
from shared.jobs import state
from tests.stored_jobs import add_checkpoint, add_job, deliver_adapter, job_prefix


@pytest.fixture
def production(production_env, monkeypatch):
    for key, value in {**production_env, "TUNEQUEUE_KEEP_CHECKPOINTS": "2"}.items():
        monkeypatch.setenv(key, value)
    for cached in (settings.get_settings, db.get_engine, db.get_sessionmaker, storage.get_storage, queue.get_celery):
        cached.cache_clear()
    from shared import migrate

    migrate.upgrade()


def stored(job_id: str) -> set[str]:
    """The job's objects, each as its name under the job's prefix."""
    from shared.jobs.models import Job

    with db.session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        prefix = job_prefix(job.tenant, job_id)
    return {key.removeprefix(prefix) for key in storage.get_storage().list_keys(prefix)}


def rows(job_id: str) -> list[tuple[int, str, bool]]:
    """(step, object name, resumable) of each of the job's checkpoints, newest first."""
    from shared.jobs.models import Checkpoint

    with db.session_scope() as session:
        found = session.execute(
            select(Checkpoint.step, Checkpoint.storage_key, Checkpoint.resumable)
            .where(Checkpoint.job_id == job_id)
            .order_by(Checkpoint.step.desc(), Checkpoint.created_at.desc())
        )
        return [(step, key.rsplit("/", 1)[-1], resumable) for step, key, resumable in found]


def with_marker(*names: str) -> set[str]:
    return {n for name in names for n in (name, f"{name}.complete")}


def test_sweeper_keeps_the_newest_checkpoints_and_what_a_job_still_needs(production):
    from shared.jobs.models import Job
    from shared.jobs.recovery import sweep
    from shared.quotas import usage

    # Succeeded, paused once at step 2 (that saved state is superseded), its adapter from an older step.
    done = add_job("t", state.SUCCEEDED)
    old_state = add_checkpoint(done, 2, name="saved-at-step")
    for step in (1, 3, 4, 5):
        add_checkpoint(done, step)
    deliver_adapter(done, 3)
    storage.get_storage().put_bytes(f"{job_prefix('t', done)}attempt-1/attempt.log", b"log")
    with db.session_scope() as session:
        session.get(Job, done).resume_key = old_state
    # Running attempt 2 after attempt 1: its newest two are what it resumes from if it is lost. Two of
    # attempt 1's failed verification (marked unusable): the one among the newest waits until it is older.
    running = add_job("t", state.RUNNING, attempt=2)
    for step, attempt in ((10, 1), (20, 1), (30, 2)):
        add_checkpoint(running, step, attempt=attempt)
    for step in (5, 25):
        add_checkpoint(running, step, resumable=False)
    # Paused: its saved state is kept while it may resume from it, even behind newer checkpoints.
    paused = add_job("t", state.PAUSED)
    saved = add_checkpoint(paused, 7, name="saved-at-step")
    for step in (8, 9):
        add_checkpoint(paused, step)
    with db.session_scope() as session:
        session.get(Job, paused).resume_key = saved
        before = usage(session, "t").bytes

    report = sweep()
    assert len(report.collected_checkpoints) == 5  # done: steps 1, 2 (the old saved state), 3; running: 5, 10

    assert rows(done) == [(5, "step-5.zip", True), (4, "step-4.zip", True), (3, "adapter.zip", False)]
    assert stored(done) == with_marker("attempt-1/checkpoints/step-5.zip", "attempt-1/checkpoints/step-4.zip") | {
        "attempt-1/adapter.zip",
        "attempt-1/attempt.log",
    }
    assert rows(running) == [(30, "step-30.zip", True), (25, "step-25.zip", False), (20, "step-20.zip", True)]
    assert stored(running) == with_marker(
        "attempt-2/checkpoints/step-30.zip", "attempt-1/checkpoints/step-25.zip", "attempt-1/checkpoints/step-20.zip"
    )
    assert [name for _, name, _ in rows(paused)] == ["step-9.zip", "step-8.zip", "saved-at-step-7.zip"]
    assert len(stored(paused)) == 6
    with db.session_scope() as session:
        assert session.get(Job, done).resume_key is None  # its saved state was collected
        assert session.get(Job, paused).resume_key == saved
        assert usage(session, "t").bytes == before - 5 * 100

    assert sweep().collected_checkpoints == []  # nothing more to do
    assert len(rows(done)) == 3 and len(stored(done)) == 6


def test_two_sweepers_at_once_collect_each_checkpoint_once(production):
    from shared.jobs.recovery import sweep

    jobs = [add_job("t", state.SUCCEEDED) for _ in range(3)]
    for job_id in jobs:
        for step in range(1, 7):
            add_checkpoint(job_id, step)
    collected: list[list[str]] = []
    errors: list[BaseException] = []

    def sweeper() -> None:
        try:
            collected.append(sweep().collected_checkpoints)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sweeper) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert len(set(collected[0]) | set(collected[1])) == 3 * 4
    for job_id in jobs:
        assert [step for step, _, _ in rows(job_id)] == [6, 5]
        assert stored(job_id) == with_marker("attempt-1/checkpoints/step-6.zip", "attempt-1/checkpoints/step-5.zip")


def test_a_lost_attempts_unrecorded_uploads_are_deleted_when_it_is_given_up(production):
    """A worker killed between uploading a checkpoint and recording it leaves an object no row accounts for.
    The sweeper that requeues the lost attempt deletes it; a live attempt's uploads in flight are left alone."""
    from shared.ids import now
    from shared.jobs.models import Job
    from shared.jobs.recovery import sweep
    from shared.jobs.retention import discard_unrecorded

    def upload_without_row(job_id: str, name: str) -> None:
        for key in with_marker(f"{job_prefix('t', job_id)}{name}"):
            storage.get_storage().put_bytes(key, b"x")

    lost = add_job("t", state.RUNNING)
    add_checkpoint(lost, 10)
    upload_without_row(lost, "attempt-1/checkpoints/step-20.zip")
    storage.get_storage().put_bytes(f"{job_prefix('t', lost)}attempt-1/adapter.zip", b"A")
    storage.get_storage().put_bytes(f"{job_prefix('t', lost)}attempt-1/attempt.log", b"log")
    with db.session_scope() as session:
        session.get(Job, lost).lease_expires_at = now() - 1
    live = add_job("t", state.RUNNING, attempt=2)
    upload_without_row(live, "attempt-1/checkpoints/step-5.zip")  # attempt 1 lost earlier, never swept
    upload_without_row(live, "attempt-2/checkpoints/step-9.zip")  # attempt 2 is recording it right now

    report = sweep()

    assert report.requeued == [lost]
    assert stored(lost) == with_marker("attempt-1/checkpoints/step-10.zip") | {"attempt-1/attempt.log"}
    assert rows(lost) == [(10, "step-10.zip", True)]
    assert discard_unrecorded(storage.get_storage(), live, 2) == []  # still its attempt: nothing touched
    assert len(stored(live)) == 4
    deleted = discard_unrecorded(storage.get_storage(), live, 1)
    assert sorted(key.rsplit("/", 1)[-1] for key in deleted) == ["step-5.zip", "step-5.zip.complete"]
    assert stored(live) == with_marker("attempt-2/checkpoints/step-9.zip")
