"""The job state machine on a real (SQLite) database: allowed moves, terminal states, attempt fencing."""

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from shared.ids import now
from shared.jobs import execution, state
from shared.jobs.models import Job, JobEvent
from shared.models import Base


@pytest.fixture
def session(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'state.db'}")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        yield session


def add_job(session, status=state.QUEUED) -> str:
    job = Job(
        id="ftjob-1",
        status=status,
        model="m",
        training_file="file-1",
        seed=1,
        hyperparameters={},
        training_options={},
        result_files=[],
        created_at=now(),
        updated_at=now(),
        attempt=0,
        cancel_requested=False,
        tenant="t",
    )
    session.add(job)
    session.flush()
    return job.id


def status(session, job_id):
    return session.get(Job, job_id, populate_existing=True).status


def test_claim_increments_attempt_and_only_once(session):
    job_id = add_job(session)
    assert execution.claim_job(session, job_id, "w1") == 1
    assert execution.claim_job(session, job_id, "w2") is None
    job = session.get(Job, job_id)
    assert (job.status, job.attempt, job.worker) == (state.RUNNING, 1, "w1")


def test_terminal_states_are_final(session):
    job_id = add_job(session)
    attempt = execution.claim_job(session, job_id, "w")
    assert execution.succeed_job(session, job_id, attempt, fine_tuned_model="ft:x")
    for target in (state.FAILED, state.CANCELLED, state.RUNNING, state.QUEUED):
        assert not state.transition(session, job_id, target)
    assert status(session, job_id) == state.SUCCEEDED


def test_stale_attempt_changes_nothing(session):
    job_id = add_job(session)
    attempt = execution.claim_job(session, job_id, "w")
    assert not execution.succeed_job(session, job_id, attempt + 1)
    assert not execution.add_event(session, job_id, attempt + 1, "from a stale worker")
    assert not execution.record_metrics(session, job_id, attempt + 1, {"step": 1, "total_steps": 2, "train_loss": 1.0})
    assert status(session, job_id) == state.RUNNING
    assert all("stale" not in e.message for e in session.query(JobEvent))


def test_queued_job_cannot_succeed_directly(session):
    job_id = add_job(session)
    assert not state.transition(session, job_id, state.SUCCEEDED)
    with pytest.raises(ValueError):
        state.transition(session, job_id, state.SUCCEEDED, expect={state.QUEUED})


def test_every_transition_writes_an_event(session):
    job_id = add_job(session, state.VALIDATING)
    state.transition(session, job_id, state.QUEUED)
    attempt = execution.claim_job(session, job_id, "w")
    execution.fail_job(session, job_id, attempt, "training_error", "boom")
    events = [e.data["status"] for e in session.query(JobEvent).order_by(JobEvent.seq) if e.data]
    assert events == [state.QUEUED, state.RUNNING, state.FAILED]
    assert session.get(Job, job_id).error == {"code": "training_error", "message": "boom", "param": None}


def test_lease_is_renewed_only_by_the_current_attempt(session):
    job_id = add_job(session)
    attempt = execution.claim_job(session, job_id, "w1", lease_seconds=30)
    job = session.get(Job, job_id, populate_existing=True)
    assert now() + 25 <= job.lease_expires_at <= now() + 31
    assert execution.renew_lease(session, job_id, attempt, 60)
    assert not execution.renew_lease(session, job_id, attempt + 1, 60)  # a stale or future attempt
    assert execution.requeue_job(session, job_id, attempt, "lost", max_attempts=3) == state.QUEUED
    assert session.get(Job, job_id, populate_existing=True).lease_expires_at is None
    assert not execution.renew_lease(session, job_id, attempt, 60)  # requeued: the old attempt is done


def test_requeue_resumes_then_gives_up_after_max_attempts(session):
    job_id = add_job(session)
    for expected_attempt in (1, 2):
        attempt = execution.claim_job(session, job_id, "w")
        assert attempt == expected_attempt
        assert execution.requeue_job(session, job_id, attempt, "worker died", max_attempts=3) == state.QUEUED
    attempt = execution.claim_job(session, job_id, "w")
    assert execution.requeue_job(session, job_id, attempt, "worker died", max_attempts=3) == state.FAILED
    job = session.get(Job, job_id, populate_existing=True)
    assert job.error["code"] == "worker_lost" and "after 3 attempt(s)" in job.error["message"]
    assert execution.requeue_job(session, job_id, attempt, "again", max_attempts=3) is None  # terminal is final


def test_requeue_is_fenced_and_honours_cancel_and_pause(session):
    job_id = add_job(session)
    attempt = execution.claim_job(session, job_id, "w")
    assert execution.requeue_job(session, job_id, attempt - 1, "stale", max_attempts=3) is None
    session.get(Job, job_id).pause_requested = True
    session.flush()
    assert execution.requeue_job(session, job_id, attempt, "worker died", max_attempts=3) == state.PAUSED
    assert not session.get(Job, job_id, populate_existing=True).pause_requested
    assert state.transition(session, job_id, state.QUEUED, expect={state.PAUSED})
    attempt = execution.claim_job(session, job_id, "w")
    session.get(Job, job_id).cancel_requested = True
    session.flush()
    assert execution.requeue_job(session, job_id, attempt, "worker died", max_attempts=3) == state.CANCELLED


def test_newest_resumable_checkpoint_ignores_adapter_only_ones(session):
    job_id = add_job(session)
    attempt = execution.claim_job(session, job_id, "w")
    for step, resumable in ((5, True), (10, True), (12, False)):
        execution.record_checkpoint(
            session,
            job_id,
            attempt,
            step=step,
            metrics={},
            storage_key=f"k{step}",
            sha256="0" * 64,
            resumable=resumable,
        )
    assert execution.newest_resumable_checkpoint(session, job_id).step == 10


def test_claim_waits_while_the_tenant_is_at_its_running_limit(session):
    first = add_job(session)
    second = Job(**{c.name: getattr(session.get(Job, first), c.name) for c in Job.__table__.columns})
    second.id = "ftjob-2"
    session.add(second)
    session.flush()
    assert execution.claim_job(session, first, "w", max_running=1) == 1
    assert execution.claim_job(session, "ftjob-2", "w", max_running=1) is None
    assert execution.claim_job(session, "ftjob-2", "w", max_running=1) is None
    assert status(session, "ftjob-2") == state.QUEUED
    waiting = [e for e in session.query(JobEvent).filter_by(job_id="ftjob-2") if e.type == "waiting"]
    assert len(waiting) == 1 and "TUNEQUEUE_MAX_RUNNING_JOBS_PER_TENANT" in waiting[0].message  # said once
    assert execution.succeed_job(session, first, 1)
    assert execution.claim_job(session, "ftjob-2", "w", max_running=1) == 1


def test_fair_share_lets_a_waiting_tenant_go_first(session):
    first = add_job(session)  # tenant "t"
    template = {c.name: getattr(session.get(Job, first), c.name) for c in Job.__table__.columns}
    session.add_all(
        [Job(**{**template, "id": "ftjob-t2"}), Job(**{**template, "id": "ftjob-u1", "tenant": "u", "priority": 0})]
    )
    session.flush()
    assert execution.claim_job(session, first, "w") == 1  # t has one running now
    t2, u1 = session.get(Job, "ftjob-t2"), session.get(Job, "ftjob-u1")
    assert execution.tenant_to_serve_first(session, t2, max_devices=1) == "u"  # u has none running
    assert execution.tenant_to_serve_first(session, u1, max_devices=1) is None
    assert execution.tenant_to_serve_first(session, t2, max_devices=1, max_running=0) is None  # u cannot start
    session.get(Job, "ftjob-u1").priority = 0
    t2.priority = 5
    session.flush()
    assert execution.tenant_to_serve_first(session, t2, max_devices=1) is None  # higher priority goes regardless
