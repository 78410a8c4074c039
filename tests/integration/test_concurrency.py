"""Workers racing each other on Postgres: several real worker processes, short sweeps that keep offering the
same jobs again (duplicate messages), and more jobs than room. One tenant's running limit holds across
workers (claims of a tenant's jobs take turns on an advisory lock), and no device slot is ever given to two
jobs, however many threads and workers go for it at once.

Two claims landing within the same few milliseconds is what the lock is for; real workers hit that now and
then, not on every run. `test_two_claims_at_the_same_moment_take_turns_on_the_tenants_lock` therefore stages
it with two database sessions, and the worker tests check the outcome end to end."""

import json
import threading

from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session

from shared import migrate
from shared.ids import now
from shared.jobs import execution, state
from shared.jobs.models import Job
from tests.faults import wait_for
from tests.support import chat, write_jsonl

# Every job without a message in the broker is offered again within about a second, so refused and bounced
# jobs come back at once, in bursts, to every worker.
RACE_ENV = {
    "TUNEQUEUE_SWEEP_SECONDS": "0.5",
    "TUNEQUEUE_REPUBLISH_AFTER_SECONDS": "1",
    "TUNEQUEUE_SLOT_WAIT_SECONDS": "0.3",
    "TUNEQUEUE_HEARTBEAT_SECONDS": "1",
    # Several workers on one 2-core machine: no ready process per slot importing beside the others' jobs.
    "TUNEQUEUE_WARM_RUNTIMES": "0",
}
TINY_JOB = {"n_epochs": 1, "batch_size": 4}  # 12 examples: 3 steps


def rows(env: dict, sql: str) -> list[dict]:
    engine = create_engine(env["TUNEQUEUE_DATABASE_URL"])
    with engine.connect() as connection:
        found = [dict(r) for r in connection.execute(text(sql)).mappings()]
    engine.dispose()
    return found


def submit_tiny_jobs(stack, tmp_path, count: int) -> list[str]:
    data = write_jsonl(tmp_path / "tiny.jsonl", [chat(f"Item {i}?", f"Squawk {i}!") for i in range(12)])
    file_id = stack.upload(data)["id"]
    return [
        stack.create_job(model="tiny-llama", training_file=file_id, hyperparameters=TINY_JOB)["id"]
        for _ in range(count)
    ]


def most_running_at_once(env: dict, job_ids: list[str]) -> int:
    """Replays the jobs' status changes in the order they were written (`seq` is taken inside each
    transition's transaction, and a claim that passed the limit check ran after the previous job's
    transition out of `running` had committed) and returns the most jobs that were `running` together."""
    events = rows(env, "SELECT job_id, data FROM job_events ORDER BY seq")
    running: set[str] = set()
    most = 0
    for event in events:
        data = json.loads(event["data"]) if isinstance(event["data"], str) else event["data"]
        status = (data or {}).get("status")
        if event["job_id"] not in job_ids or status is None:
            continue
        if status == "running":
            running.add(event["job_id"])
        else:
            running.discard(event["job_id"])
        most = max(most, len(running))
    return most


def overlaps(intervals: list[tuple[int, int, str]], slack_ms: int = 0) -> list[tuple]:
    """Pairs of (start, end, job) intervals of different jobs that overlap by more than `slack_ms`."""
    ordered = sorted(intervals)
    return [
        (a, b)
        for i, a in enumerate(ordered)
        for b in ordered[i + 1 :]
        if a[2] != b[2] and min(a[1], b[1]) - b[0] > slack_ms
    ]


def queued_job(job_id: str, tenant: str) -> Job:
    return Job(
        id=job_id,
        tenant=tenant,
        status=state.QUEUED,
        model="tiny-llama",
        training_file="file-1",
        seed=1,
        hyperparameters={},
        training_options={},
        result_files=[],
        created_at=now(),
        updated_at=now(),
        attempt=0,
        cancel_requested=False,
    )


def waiting_on_an_advisory_lock(engine) -> bool:
    with engine.connect() as connection:
        found = connection.execute(
            text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'")
        )
        return bool(found.scalar())


def test_two_claims_at_the_same_moment_take_turns_on_the_tenants_lock(postgres_url):
    """The race that two workers run into now and then, made certain: a claim of one of the tenant's jobs is
    inside its transaction, not yet committed, when a claim of another of its jobs starts. The second must wait
    for the first to commit, and then find the tenant at its limit."""
    migrate.upgrade(url=postgres_url)
    engine = create_engine(postgres_url)
    with Session(engine) as session:
        session.add_all([queued_job("ftjob-a", "t"), queued_job("ftjob-b", "t")])
        session.commit()
    first, second = Session(engine), Session(engine)
    claims: dict[str, int | None] = {}

    def claim_second() -> None:
        claims["b"] = execution.claim_job(second, "ftjob-b", "worker-2", max_running=1)
        second.commit()

    try:
        assert execution.claim_job(first, "ftjob-a", "worker-1", max_running=1) == 1  # open, not committed
        racer = threading.Thread(target=claim_second, daemon=True)
        racer.start()
        wait_for(lambda: waiting_on_an_advisory_lock(engine) or not racer.is_alive(), 30, "the second claim")
        assert racer.is_alive(), f"the second claim went through the first one's transaction: {claims}"
        first.commit()
        racer.join(timeout=30)
        assert claims == {"b": None}  # it waited, then saw the tenant's one job running
        with Session(engine) as session:
            running = session.scalars(select(Job.id).where(Job.status == state.RUNNING)).all()
        assert running == ["ftjob-a"]
    finally:
        first.close()
        second.close()
        engine.dispose()


def test_one_tenants_running_limit_holds_across_two_workers(production_env, make_stack, tiny_model, tmp_path):
    env = {**production_env, **RACE_ENV, "TUNEQUEUE_MAX_RUNNING_JOBS_PER_TENANT": "1"}
    stack = make_stack(env, tiny_model, worker=False)
    for name in ("node-a", "node-b"):  # 2 slots each: without the limit, all 3 jobs would train at once
        stack.start_worker(name, "--cpu-slots", "2")
    stack.wait_for_workers(2)

    job_ids = submit_tiny_jobs(stack, tmp_path, 3)  # all of the stack's tenant, `default`
    jobs = [stack.wait(job_id, timeout=300) for job_id in job_ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 3, stack.logs()

    # Device use, in wall-clock time: a device is released (and its end recorded) just after its job's final
    # transition, so the last job's end may still be on its way, and the next job may start a few
    # milliseconds before the previous end is written, never more.
    usage = wait_for(
        lambda: (found := rows(env, "SELECT * FROM device_usage")) and all(r["ended_at_ms"] for r in found) and found,
        timeout=30,
        what="every device's end to be recorded",
    )
    assert sorted(r["job_id"] for r in usage) == sorted(job_ids)  # each job trained once, on one device
    intervals = [(r["started_at_ms"], r["ended_at_ms"], r["job_id"]) for r in usage]
    assert overlaps(intervals, slack_ms=1000) == [], "two of the tenant's jobs trained at once"
    assert most_running_at_once(env, job_ids) == 1
    waits = rows(env, "SELECT count(*) AS n FROM job_events WHERE type = 'waiting'")[0]["n"]
    assert waits >= 1  # some claims were refused by the limit, not only kept apart by timing


def test_three_workers_racing_for_slots_never_share_a_device(production_env, make_stack, tiny_model, tmp_path):
    env = {**production_env, **RACE_ENV}
    stack = make_stack(env, tiny_model, worker=False)
    # One slot and two Celery threads each: both threads of a worker take jobs, so they queue for the one
    # slot, while the sweepers publish bounced jobs again and the three workers claim against each other.
    for name in ("node-a", "node-b", "node-c"):
        stack.start_worker(name, "--cpu-slots", "1")
    stack.wait_for_workers(3)

    job_ids = submit_tiny_jobs(stack, tmp_path, 5)  # for 3 slots
    jobs = [stack.wait(job_id, timeout=300) for job_id in job_ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 5, stack.logs()

    usage = wait_for(  # the last jobs' ends are recorded just after their final transitions
        lambda: (found := rows(env, "SELECT * FROM device_usage")) and all(r["ended_at_ms"] for r in found) and found,
        timeout=30,
        what="every device's end to be recorded",
    )
    assert sorted(r["job_id"] for r in usage) == sorted(job_ids)  # every job claimed and run exactly once...
    assert all(r["attempt"] == 1 for r in usage)  # ...on its first attempt
    by_device: dict[tuple[str, str], list[tuple[int, int, str]]] = {}
    for r in usage:
        by_device.setdefault((r["worker"], r["device"]), []).append((r["started_at_ms"], r["ended_at_ms"], r["job_id"]))
    for device, intervals in by_device.items():
        # Exact: a device's end is recorded before the slot is released, and its next start after it is taken.
        assert overlaps(intervals) == [], f"{device} held by two jobs at once: {sorted(intervals)}"
    assert len(by_device) == 3, f"not every worker trained: {sorted(by_device)}"
