"""Chaos: kill, freeze and restart the real parts mid-run (worker processes, the training child, Redis, Postgres,
object storage) and check that every accepted job still ends exactly once, with one verified adapter, and
that a retried attempt continues from its checkpoint instead of starting over.

Each scenario ends with `check_invariants` over the whole database and bucket. Recovery times are printed in
pytest's terminal summary (see `CHAOS_REPORT`)."""

import hashlib
import json
import os
import re
import signal
import time

import boto3
import pytest
from sqlalchemy import create_engine, text

from tests.faults import FlakyS3, restart_redis, start_postgres, stop_postgres, wait_for
from tests.support import TERMINAL, chat, training_processes, write_jsonl

CHAOS_REPORT: list[dict] = []

# Short leases and sweeps so that recovery fits in a test; production defaults are 60 s and 15 s.
CHAOS_ENV = {
    "TUNEQUEUE_LEASE_SECONDS": "4",
    "TUNEQUEUE_SWEEP_SECONDS": "1",
    "TUNEQUEUE_REPUBLISH_AFTER_SECONDS": "3",
    "TUNEQUEUE_CHECKPOINT_EVERY_STEPS": "5",
    "TUNEQUEUE_MAX_ATTEMPTS": "3",
    "TUNEQUEUE_HEARTBEAT_SECONDS": "1",
    # A worker frozen inside a transaction holds the job's row lock until Postgres ends it (60 s in production).
    "TUNEQUEUE_WORKER_IDLE_TRANSACTION_SECONDS": "15",
}


@pytest.fixture
def chaos_env(production_env):
    return {**production_env, **CHAOS_ENV}


class Inspector:
    """Reads the database and the bucket directly, behind the service's back."""

    def __init__(self, env: dict, s3_endpoint: str):
        self.engine = create_engine(env["TUNEQUEUE_DATABASE_URL"], pool_pre_ping=True)
        bucket, _, prefix = env["TUNEQUEUE_STORAGE_URL"].removeprefix("s3://").partition("/")
        self.bucket, self.prefix = bucket, prefix
        self.s3 = boto3.client("s3", endpoint_url=s3_endpoint)

    def job(self, job_id: str) -> dict:
        with self.engine.connect() as connection:
            return dict(connection.execute(text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id}).mappings().one())

    def rows(self, sql: str, **params) -> list[dict]:
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(text(sql), params).mappings()]

    def checkpoints(self, job_id: str) -> list[dict]:
        return self.rows("SELECT * FROM checkpoints WHERE job_id = :id ORDER BY step", id=job_id)

    def events(self, job_id: str) -> list[dict]:
        rows = self.rows("SELECT * FROM job_events WHERE job_id = :id ORDER BY seq", id=job_id)
        for row in rows:
            if isinstance(row["data"], str):
                row["data"] = json.loads(row["data"])
        return rows

    def keys(self, under: str) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{self.prefix}/{under}")
        return [item["Key"].removeprefix(self.prefix + "/") for page in pages for item in page.get("Contents", [])]

    def sha256(self, key: str) -> str:
        body = self.s3.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}")["Body"].read()
        return hashlib.sha256(body).hexdigest()

    def dispose(self) -> None:
        self.engine.dispose()


@pytest.fixture
def inspector(chaos_env, moto_endpoint):
    inspector = Inspector(chaos_env, moto_endpoint)
    yield inspector
    inspector.dispose()


def check_invariants(inspector: Inspector, job_ids: list[str]) -> None:
    """Every accepted job terminal; no orphan training process; one verified adapter per succeeded job and none
    otherwise; no stored object that the database does not account for (nothing half-written or left by a
    stale attempt); and no write by an attempt after that attempt ended (fencing)."""
    all_ids = {r["id"] for r in inspector.rows("SELECT id FROM jobs")}
    assert set(job_ids) == all_ids, "a job appeared or vanished"
    for job_id in job_ids:
        job = inspector.job(job_id)
        assert job["status"] in TERMINAL, f"{job_id} is still {job['status']}"
        assert job["lease_expires_at"] is None
        assert training_processes(job_id) == [], f"orphan training process for {job_id}"
        keys = inspector.keys(f"tenants/{job['tenant']}/jobs/{job_id}/")
        adapters = [k for k in keys if k.endswith("/adapter.zip")]
        if job["status"] == "succeeded":
            assert adapters == [job["adapter_key"]], adapters
            assert inspector.sha256(job["adapter_key"]) == job["adapter_sha256"]
        else:
            assert adapters == []
        checkpoints = inspector.checkpoints(job_id)
        recorded = {c["storage_key"] for c in checkpoints}
        for checkpoint in checkpoints:
            if checkpoint["resumable"]:
                assert inspector.sha256(checkpoint["storage_key"]) == checkpoint["sha256"]
                assert f"{checkpoint['storage_key']}.complete" in keys
        unaccounted = [k for k in keys if k not in recorded and k.removesuffix(".complete") not in recorded]
        assert unaccounted == [], f"objects no checkpoint or adapter accounts for: {unaccounted}"
        # Fencing: once an attempt has ended (its transition out of `running`), its worker writes nothing more.
        ended: dict[int, int] = {}
        for event in inspector.events(job_id):
            attempt, status = event["attempt"], (event["data"] or {}).get("status")
            if attempt in ended and attempt > 0 and status is None:
                raise AssertionError(f"attempt {attempt} of {job_id} wrote after it ended: {event}")
            if status and status != "running":
                ended.setdefault(attempt, event["seq"])
        starts = [e["attempt"] for e in inspector.events(job_id) if (e["data"] or {}).get("status") == "running"]
        assert starts == sorted(set(starts)), f"an attempt started twice: {starts}"


def parrot(tmp_path, n=32):
    return write_jsonl(
        tmp_path / "train.jsonl", [chat(f"Tell me about item {i}", f"Squawk! Item {i}. Squawk!") for i in range(n)]
    )


def submit(stack, tmp_path, n_epochs=12, **extra) -> str:
    file = stack.upload(parrot(tmp_path))
    job = stack.create_job(
        model="tiny-llama",
        training_file=file["id"],
        seed=3,
        hyperparameters={"n_epochs": n_epochs, "batch_size": 4, "learning_rate_multiplier": 5},
        **extra,
    )
    return job["id"]


def wait_for_checkpoint(inspector: Inspector, job_id: str, timeout: float = 240) -> dict:
    return wait_for(
        lambda: next((c for c in reversed(inspector.checkpoints(job_id)) if c["resumable"]), None),
        timeout,
        f"a resumable checkpoint of {job_id}",
    )


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def recipe_of(job_id: str) -> int:
    return wait_for(lambda: (training_processes(job_id) or [None])[0], 120, f"the recipe of {job_id}")


def resumed_step(inspector: Inspector, job_id: str, attempt: int) -> int:
    for event in inspector.events(job_id):
        match = re.match(r"Resuming from the checkpoint at step (\d+)", event["message"])
        if match and event["attempt"] == attempt:
            return int(match.group(1))
    raise AssertionError(f"attempt {attempt} of {job_id} did not resume from a checkpoint")


def check_steps_continue(stack, inspector: Inspector, job: dict, resumed_at: int, attempt: int) -> None:
    """The retried attempt picked up at the checkpoint's step: its first metric is past it, and the results
    file has every step exactly once (no restart from step 1, no gap)."""
    metrics = [e for e in inspector.events(job["id"]) if e["type"] == "metrics" and e["attempt"] == attempt]
    assert metrics and metrics[0]["data"]["step"] > resumed_at
    assert max(m["data"]["step"] for m in metrics) == metrics[0]["data"]["total_steps"]
    csv = stack.client.get(f"/v1/files/{job['result_files'][0]}/content").text.splitlines()[1:]
    steps = [int(line.split(",")[0]) for line in csv]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] == metrics[0]["data"]["total_steps"]


def report(scenario: str, **figures) -> None:
    CHAOS_REPORT.append({"scenario": scenario, "result": "pass", **figures})


def test_worker_killed_mid_training_finishes_on_another_worker(make_stack, chaos_env, tiny_model, tmp_path, inspector):
    stack = make_stack(chaos_env, tiny_model)
    stack.start_worker("worker-b")
    job_id = submit(stack, tmp_path)
    checkpoint = wait_for_checkpoint(inspector, job_id)
    recipe = recipe_of(job_id)
    owner = parent_of(recipe)
    os.kill(owner, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: recipe not in training_processes(job_id), 10, "the orphaned recipe to die with its worker")
    wait_for(
        lambda: inspector.job(job_id)["attempt"] == 2 and inspector.job(job_id)["status"] == "running", 60, "attempt 2"
    )
    running_again = time.monotonic() - killed
    wait_for(lambda: recipe_of(job_id), 60, "attempt 2's recipe")
    overview = stack.client.get("/admin/overview").json()
    [running] = overview["running"]
    assert (running["id"], running["attempt"]) == (job_id, 2) and running["lease_seconds_left"] > 0
    assert running["worker"] in {w["hostname"] for w in overview["workers"]}

    job = stack.wait(job_id, timeout=300)
    assert job["status"] == "succeeded", (job["error"], stack.logs())
    row = inspector.job(job_id)
    assert row["attempt"] == 2 and not row["worker"].endswith(f":{owner}")
    resumed_at = resumed_step(inspector, job_id, 2)
    assert resumed_at >= checkpoint["step"]
    check_steps_continue(stack, inspector, job, resumed_at, attempt=2)
    check_invariants(inspector, [job_id])
    report("kill -9 worker mid-training", running_again_s=round(running_again, 1), resumed_at_step=resumed_at)


def test_training_child_killed_is_retried(make_stack, chaos_env, tiny_model, tmp_path, inspector):
    stack = make_stack(chaos_env, tiny_model)
    job_id = submit(stack, tmp_path)
    wait_for_checkpoint(inspector, job_id)
    os.kill(recipe_of(job_id), signal.SIGKILL)
    killed = time.monotonic()
    wait_for(
        lambda: inspector.job(job_id)["attempt"] == 2 and inspector.job(job_id)["status"] == "running", 60, "attempt 2"
    )
    running_again = time.monotonic() - killed
    job = stack.wait(job_id, timeout=300)
    assert job["status"] == "succeeded", (job["error"], stack.logs())
    messages = [e["message"] for e in inspector.events(job_id)]
    assert any("the training process killed by signal 9" in m and "requeued: attempt 2 of 3" in m for m in messages)
    resumed_at = resumed_step(inspector, job_id, 2)
    check_steps_continue(stack, inspector, job, resumed_at, attempt=2)
    check_invariants(inspector, [job_id])
    report("kill -9 training child", running_again_s=round(running_again, 1), resumed_at_step=resumed_at)


def test_redis_restart_and_dropped_message_lose_no_job(make_stack, chaos_env, tiny_model, tmp_path, inspector):
    import redis

    stack = make_stack(chaos_env, tiny_model)
    running = submit(stack, tmp_path, n_epochs=6)
    wait_for(lambda: inspector.job(running)["status"] == "running", 120, "the first job to run")
    queue = chaos_env["TUNEQUEUE_QUEUE_NAME"]
    client = redis.Redis(host="127.0.0.1", port=6379)

    def queued_in_redis(job_id: str) -> bool:  # validation queue and training queues, every priority level
        return any(job_id.encode() in b"".join(client.lrange(key, 0, -1)) for key in client.keys(f"{queue}*"))

    waiting = submit(stack, tmp_path, n_epochs=2)  # behind the running job: its message waits in Redis
    wait_for(lambda: queued_in_redis(waiting), 30, "the second job's message")
    down = restart_redis()  # nothing persisted: the waiting message is gone
    restarted = time.monotonic()
    dropped = submit(stack, tmp_path, n_epochs=2)

    def drop_its_message() -> bool:
        return queued_in_redis(dropped) and bool(client.delete(*client.keys(f"{queue}*")))

    wait_for(drop_its_message, 30, "the third job's message, to drop it")  # lost in the broker

    jobs = [stack.wait(job_id, timeout=300) for job_id in (running, waiting, dropped)]
    assert [j["status"] for j in jobs] == ["succeeded"] * 3, ([j["error"] for j in jobs], stack.logs())
    recovered = time.monotonic() - restarted
    # Who put the lost messages back: the sweeper ("published again"), or a worker that had taken one while
    # waiting for a slot and handed it back. Either way nothing was lost; test_sweeper pins the sweeper down.
    republished = sum(any("published again" in e["message"] for e in inspector.events(j)) for j in (waiting, dropped))
    assert inspector.job(running)["attempt"] == 1  # the running job never noticed
    check_invariants(inspector, [running, waiting, dropped])
    report(
        "Redis restarted mid-run + a dropped message",
        redis_down_s=round(down, 1),
        all_done_after_s=round(recovered, 1),
        republished_by_sweeper=republished,
    )


def test_postgres_restart_mid_run(make_stack, chaos_env, tiny_model, tmp_path, inspector):
    env = {**chaos_env, "TUNEQUEUE_LEASE_SECONDS": "30"}  # the outage is shorter than a lease: no takeover
    stack = make_stack(env, tiny_model)
    job_id = submit(stack, tmp_path)
    wait_for_checkpoint(inspector, job_id)
    stop_postgres()
    stopped = time.monotonic()
    try:
        response = wait_for(
            lambda: (r := stack.client.get(f"/v1/fine_tuning/jobs/{job_id}")).status_code == 503 and r, 30, "a 503"
        )
        assert response.headers["Retry-After"] and response.json()["error"]["message"]
        time.sleep(3)  # training goes on; the worker's writes wait
    finally:
        start_postgres()
    wait_for(lambda: stack.client.get(f"/v1/fine_tuning/jobs/{job_id}").status_code == 200, 60, "the API to recover")
    api_back = time.monotonic() - stopped
    job = stack.wait(job_id, timeout=300)
    assert job["status"] == "succeeded", (job["error"], stack.logs())
    assert inspector.job(job_id)["attempt"] == 1
    check_invariants(inspector, [job_id])
    report("Postgres restarted mid-run", api_503_then_200_after_s=round(api_back, 1), attempts=1)


def test_storage_errors_are_retried(make_stack, chaos_env, tiny_model, tmp_path, inspector, moto_endpoint):
    def flaky(method: str, path: str, nth: int) -> str | None:
        """Every artifact write: first a 503, then a write acknowledged but lost, then through."""
        if method == "PUT" and ("/attempt-" in path or "/files/" in path) and nth <= 2:
            return "error" if nth == 1 else "drop"
        return None

    proxy = FlakyS3(moto_endpoint, flaky)
    try:
        stack = make_stack({**chaos_env, "TUNEQUEUE_S3_ENDPOINT_URL": proxy.url}, tiny_model)
        job_id = submit(stack, tmp_path, n_epochs=3)
        job = stack.wait(job_id, timeout=300)
        assert job["status"] == "succeeded", (job["error"], stack.logs())
        assert proxy.count("error", "adapter.zip") == 1 and proxy.count("drop", "adapter.zip") == 1
        assert proxy.count("drop", "/checkpoints/") >= 2
        assert inspector.job(job_id)["attempt"] == 1
        check_invariants(inspector, [job_id])
    finally:
        proxy.close()
    report("storage errors and lost writes on every upload", injected_faults=len(proxy.injected), attempts=1)


def test_storage_that_keeps_failing_fails_the_job_clearly(
    make_stack, chaos_env, tiny_model, tmp_path, inspector, moto_endpoint
):
    proxy = FlakyS3(moto_endpoint, lambda method, path, nth: "error" if method == "PUT" and "adapter" in path else None)
    env = {
        **chaos_env,
        "TUNEQUEUE_S3_ENDPOINT_URL": proxy.url,
        "TUNEQUEUE_MAX_ATTEMPTS": "2",
        "TUNEQUEUE_STORAGE_RETRIES": "2",
    }
    try:
        stack = make_stack(env, tiny_model)
        job_id = submit(stack, tmp_path, n_epochs=1)
        job = stack.wait(job_id, timeout=300)
    finally:
        proxy.close()
    assert job["status"] == "failed" and job["error"]["code"] == "storage_error", job["error"]
    assert "adapter.zip" in job["error"]["message"] and "giving up after 2 attempt(s)" in job["error"]["message"]
    assert job["fine_tuned_model"] is None
    check_invariants(inspector, [job_id])
    report("storage keeps failing the adapter upload", outcome="failed storage_error after 2 attempts")


def test_frozen_worker_loses_its_job_and_changes_nothing(make_stack, chaos_env, tiny_model, tmp_path, inspector):
    stack = make_stack(chaos_env, tiny_model)
    stack.start_worker("worker-b")
    job_id = submit(stack, tmp_path)
    wait_for_checkpoint(inspector, job_id)
    first_recipe = recipe_of(job_id)
    frozen = parent_of(first_recipe)
    os.kill(frozen, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        wait_for(
            lambda: inspector.job(job_id)["attempt"] == 2 and inspector.job(job_id)["status"] == "running",
            60,
            "a takeover",
        )
        taken_over = time.monotonic() - stopped
        wait_for(lambda: [p for p in training_processes(job_id) if p != first_recipe], 60, "attempt 2's recipe")
    finally:
        os.kill(frozen, signal.SIGCONT)
    wait_for(lambda: first_recipe not in training_processes(job_id), 30, "the stale worker to stop its recipe")
    job = stack.wait(job_id, timeout=300)
    assert job["status"] == "succeeded", (job["error"], stack.logs())
    assert not inspector.job(job_id)["worker"].endswith(f":{frozen}")
    check_invariants(inspector, [job_id])  # includes: attempt 1 wrote nothing after it was reaped
    report("worker frozen (SIGSTOP) past its lease", taken_over_after_s=round(taken_over, 1))


def test_sigterm_checkpoints_and_requeues(make_stack, chaos_env, tiny_model, tmp_path, inspector):
    stack = make_stack(chaos_env, tiny_model)
    job_id = submit(stack, tmp_path)
    wait_for(lambda: len(inspector.events(job_id)) and inspector.job(job_id)["progress"], 120, "training to report")
    owner = parent_of(recipe_of(job_id))
    os.kill(owner, signal.SIGTERM)
    signalled = time.monotonic()
    worker = next(p for p in stack.processes if p.pid == owner)
    assert worker.wait(timeout=60) == 0  # a clean exit, after the job was handed back
    drained = time.monotonic() - signalled
    row = inspector.job(job_id)
    assert row["status"] == "queued", row["status"]
    saved = max(c["step"] for c in inspector.checkpoints(job_id) if c["resumable"])
    assert any("shut down; its state at step" in e["message"] for e in inspector.events(job_id))
    stack.start_worker("worker-next")
    job = stack.wait(job_id, timeout=300)
    assert job["status"] == "succeeded", (job["error"], stack.logs())
    assert resumed_step(inspector, job_id, 2) == saved
    check_steps_continue(stack, inspector, job, saved, attempt=2)
    check_invariants(inspector, [job_id])
    report("SIGTERM to the worker", drained_in_s=round(drained, 1), saved_at_step=saved)


def worker_of(stack, job_id: str) -> int:
    """The worker process running `job_id` (an ancestor of its recipe: under torchrun, the grandparent)."""
    workers = {p.pid for p in stack.processes}
    pid = recipe_of(job_id)
    while pid not in workers:
        pid = parent_of(pid)
        assert pid > 1, f"no worker of this stack runs {job_id}"
    return pid


def test_two_device_job_pauses_resumes_and_survives_its_worker(make_stack, chaos_env, tiny_model, tmp_path, inspector):
    """Every rank of a 2-device DeepSpeed job saves its ZeRO shard: a pause, its resume, and a kill -9 of the
    worker mid-run each continue from the last saved step, on the same or on another 2-slot worker."""
    stack = make_stack({**chaos_env, "TUNEQUEUE_MAX_ATTEMPTS": "5"}, tiny_model, worker=False)
    for name in ("node-a", "node-b"):
        stack.start_worker(name, "--cpu-slots", "2")
    stack.wait_for_workers(2)
    job_id = submit(stack, tmp_path, n_epochs=5, resources={"devices": 2})
    wait_for_checkpoint(inspector, job_id)
    assert stack.client.post(f"/v1/fine_tuning/jobs/{job_id}/pause").status_code == 200
    paused = wait_for(lambda: inspector.job(job_id)["status"] == "paused" and inspector.job(job_id), 120, "the pause")
    saved = max(c["step"] for c in inspector.checkpoints(job_id) if c["resumable"])
    assert training_processes(job_id) == []  # torchrun and both ranks are gone, the slots free

    assert stack.client.post(f"/v1/fine_tuning/jobs/{job_id}/resume").status_code == 200
    wait_for(
        lambda: max(c["step"] for c in inspector.checkpoints(job_id) if c["resumable"]) > saved,
        240,
        "a checkpoint of the resumed attempt",
    )
    assert resumed_step(inspector, job_id, paused["attempt"] + 1) == saved
    owner = worker_of(stack, job_id)
    os.kill(owner, signal.SIGKILL)
    killed = time.monotonic()
    last = paused["attempt"] + 2
    wait_for(lambda: inspector.job(job_id)["attempt"] == last, 90, "the attempt after the kill")
    running_again = time.monotonic() - killed
    job = stack.wait(job_id, timeout=400)
    assert job["status"] == "succeeded", (job["error"], stack.logs())
    assert inspector.job(job_id)["attempt"] == last
    resumed_at = resumed_step(inspector, job_id, last)
    assert resumed_at > saved
    check_steps_continue(stack, inspector, job, resumed_at, attempt=last)
    check_invariants(inspector, [job_id])
    report(
        "2-device ZeRO-2 job: pause, resume, kill -9 its worker",
        paused_at_step=saved,
        resumed_after_kill_at_step=resumed_at,
        running_again_s=round(running_again, 1),
    )
