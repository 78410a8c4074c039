"""Chaos: kill, freeze and restart the real parts mid-run (worker processes, the training child, Redis, Postgres,
object storage) and check that every accepted job still ends exactly once, with one verified adapter, and
that a retried attempt continues from its checkpoint instead of starting over.

Each scenario ends with `check_invariants` over the whole database and bucket. Each runs inside `scenario`,
which adds its row to `CHAOS_REPORT`: its figures (recovery times), and "pass" only if every step and check
passed, else "fail" with the first failure. pytest's terminal summary prints the rows."""

import hashlib
import json
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

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

    def body(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}")["Body"].read()

    def sha256(self, key: str) -> str:
        return hashlib.sha256(self.body(key)).hexdigest()

    def url_path(self, key: str) -> str:
        """The path of `key` in an S3 request (what a `FlakyS3` rule sees)."""
        return f"/{self.bucket}/{self.prefix}/{key}"

    def dispose(self) -> None:
        self.engine.dispose()


@pytest.fixture
def inspector(chaos_env, moto_endpoint):
    inspector = Inspector(chaos_env, moto_endpoint)
    yield inspector
    inspector.dispose()


def canonical(value) -> str:
    """A JSON column's value in one spelling, to compare values written by different statements."""
    return json.dumps(json.loads(value) if isinstance(value, str) else value, sort_keys=True)


class ProgressWatch:
    """Samples a job's progress column while a scenario runs: `check_fencing` then checks that every value
    the job showed was recorded by the attempt that owned it at the time, even one overwritten since."""

    def __init__(self, inspector: Inspector, job_id: str, interval: float = 0.1):
        self.seen: set[str] = set()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(inspector, job_id, interval), daemon=True)
        self._thread.start()

    def _sample(self, inspector: Inspector, job_id: str, interval: float) -> None:
        while not self._done.wait(interval):
            try:
                progress = inspector.job(job_id)["progress"]
            except Exception:  # the database is away in some scenarios: a missed sample, nothing more
                continue
            if progress is not None:
                self.seen.add(canonical(progress))

    def stop(self) -> set[str]:
        self._done.set()
        self._thread.join(timeout=10)
        return self.seen


def check_invariants(inspector: Inspector, job_ids: list[str], seen_progress: set[str] = frozenset()) -> None:
    """Every accepted job terminal; no orphan training process; one verified adapter per succeeded job and none
    otherwise; no stored object that the database does not account for (nothing half-written or left by a
    stale attempt); and no write by an attempt after that attempt ended (`check_fencing`)."""
    all_ids = {r["id"] for r in inspector.rows("SELECT id FROM jobs")}
    assert set(job_ids) == all_ids, "a job appeared or vanished"
    for job_id in job_ids:
        job = inspector.job(job_id)
        assert job["status"] in TERMINAL, f"{job_id} is still {job['status']}"
        assert job["lease_expires_at"] is None
        assert training_processes(job_id) == [], f"orphan training process for {job_id}"
        settled(lambda job=job: check_stored_objects(inspector, job))
        check_fencing(inspector, job, seen_progress)


def settled(check, seconds: float = 10) -> None:
    """`check` on a settled state: the sweeper (every second here) collects superseded checkpoints, object
    first and row after, so one look may fall between the two. A leak or a corruption stays, and fails."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return check()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def check_stored_objects(inspector: Inspector, job: dict) -> None:
    """One verified adapter for a succeeded job and none otherwise; every resumable checkpoint stored whole with
    its completion marker; no object the database does not account for."""
    job_id = job["id"]
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
    unaccounted = [
        k
        for k in keys
        if k not in recorded and k.removesuffix(".complete") not in recorded and not is_attempt_log(k, job)
    ]
    assert unaccounted == [], f"objects no checkpoint or adapter accounts for: {unaccounted}"


def is_attempt_log(key: str, job: dict) -> bool:
    """An attempt's log (`GET /v1/fine_tuning/jobs/{id}/attempts/{n}/log`), kept for every attempt the job had."""
    match = re.search(r"/attempt-(\d+)/attempt\.log$", key)
    return bool(match) and 1 <= int(match.group(1)) <= job["attempt"]


def check_fencing(inspector: Inspector, job: dict, seen_progress: set[str] = frozenset()) -> None:
    """Once an attempt has ended (its transition out of `running`), it writes nothing more: no event, no
    checkpoint row, no progress. A checkpoint row and a progress value are each written in one transaction
    with an event of their attempt (`record_checkpoint`, `record_metrics`), so each must have that event, and
    the event must come before the attempt's end. `seen_progress`: values a `ProgressWatch` saw meanwhile."""
    job_id = job["id"]
    events = inspector.events(job_id)
    ended: dict[int, dict] = {}
    for event in events:
        attempt, status = event["attempt"], (event["data"] or {}).get("status")
        if attempt in ended and attempt > 0 and status is None:
            raise AssertionError(f"attempt {attempt} of {job_id} wrote after it ended: {event}")
        if status and status != "running":
            ended.setdefault(attempt, event)
    starts = [e["attempt"] for e in events if (e["data"] or {}).get("status") == "running"]
    assert starts == sorted(set(starts)), f"an attempt started twice: {starts}"

    saved = Counter((e["attempt"], e["data"]["step"]) for e in events if e["message"].startswith("Checkpoint saved"))
    rows = Counter((c["attempt"], c["step"]) for c in inspector.checkpoints(job_id))
    assert rows <= saved, f"checkpoint rows of {job_id} with no event of their attempt: {dict(rows - saved)}"
    for checkpoint in inspector.checkpoints(job_id):
        attempt, key = checkpoint["attempt"], checkpoint["storage_key"]
        assert f"/attempt-{attempt}/" in key, f"attempt {attempt} of {job_id} recorded another attempt's {key}"
        if attempt in ended:
            assert checkpoint["created_at"] <= ended[attempt]["created_at"], (
                f"{key} recorded after attempt {attempt} ended"
            )

    metrics = [canonical(e["data"]) for e in events if e["type"] == "metrics"]
    progress = None if job["progress"] is None else canonical(job["progress"])
    assert progress == (metrics[-1] if metrics else None), f"the progress of {job_id} is not its last recorded metrics"
    stale = seen_progress - set(metrics)
    assert not stale, f"{job_id} showed progress that no attempt owning it recorded: {sorted(stale)[:2]}"
    if job["status"] == "succeeded":
        assert f"/attempt-{job['attempt']}/" in job["adapter_key"], f"{job_id} delivers another attempt's adapter"
        csv, evaluation = f"{job_id}_results.csv", f"{job_id}_evaluation.json"  # result_files in this order
        results = inspector.rows("SELECT id, filename FROM files WHERE filename IN (:a, :b)", a=csv, b=evaluation)
        results.sort(key=lambda r: r["filename"] != csv)
        assert [r["id"] for r in results] == job["result_files"], f"results files of {job_id}: {results}"


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
    events = inspector.events(job["id"])
    metrics = [e for e in events if e["type"] == "metrics" and e["attempt"] == attempt]
    assert metrics and metrics[0]["data"]["step"] > resumed_at, "\n".join(
        f"attempt {e['attempt']}: {e['message']}" for e in events if e["type"] != "metrics"
    )
    assert max(m["data"]["step"] for m in metrics) == metrics[0]["data"]["total_steps"]
    csv = stack.client.get(f"/v1/files/{job['result_files'][0]}/content").text.splitlines()[1:]
    steps = [int(line.split(",")[0]) for line in csv]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] == metrics[0]["data"]["total_steps"]


@contextmanager
def scenario(name: str) -> Iterator[dict]:
    """Run a scenario's steps and checks; the figures put in the yielded dict go into its CHAOS_REPORT row,
    whose result is "pass" only if the block ran through, else "fail" with the first failure (raised on)."""
    figures: dict = {}
    row = {"scenario": name, "test": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]}
    try:
        yield figures
    except BaseException as exc:
        reason = next(iter(str(exc).strip().splitlines()), "")[:300]
        CHAOS_REPORT.append({**row, "result": "fail", "reason": f"{type(exc).__name__}: {reason}", **figures})
        raise
    CHAOS_REPORT.append({**row, "result": "pass", **figures})


def local_checkpoint_step(out: str) -> int:
    """The newest step the recipe has saved into its own output folder (its disk, not the database)."""
    steps = [int(m.group(1)) for p in os.listdir(f"{out}/checkpoints") if (m := re.fullmatch(r"step-(\d+)", p))]
    return max(steps, default=0)


def recipe_output(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        args = cmdline.read().decode().split("\0")
    return args[args.index("--out") + 1]


def test_worker_killed_mid_training_finishes_on_another_worker(make_stack, chaos_env, tiny_model, tmp_path, inspector):
    with scenario("kill -9 worker mid-training") as figures:
        stack = make_stack(chaos_env, tiny_model)
        stack.start_worker("worker-b")
        job_id = submit(stack, tmp_path)
        checkpoint = wait_for_checkpoint(inspector, job_id)
        recipe = recipe_of(job_id)
        owner = worker_of(stack, job_id)
        os.kill(owner, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: recipe not in training_processes(job_id), 10, "the orphaned recipe to die with its worker")
        wait_for(
            lambda: inspector.job(job_id)["attempt"] == 2 and inspector.job(job_id)["status"] == "running",
            60,
            "attempt 2",
        )
        figures["running_again_s"] = round(time.monotonic() - killed, 1)
        wait_for(lambda: recipe_of(job_id), 60, "attempt 2's recipe")
        overview = stack.client.get("/admin/overview").json()
        [running] = overview["running"]
        assert (running["id"], running["attempt"]) == (job_id, 2) and running["lease_seconds_left"] > 0
        assert running["worker"] in {w["hostname"] for w in overview["workers"]}

        job = stack.wait(job_id, timeout=300)
        assert job["status"] == "succeeded", (job["error"], stack.logs())
        row = inspector.job(job_id)
        assert row["attempt"] == 2 and not row["worker"].endswith(f":{owner}")
        figures["resumed_at_step"] = resumed_at = resumed_step(inspector, job_id, 2)
        assert resumed_at >= checkpoint["step"]
        check_steps_continue(stack, inspector, job, resumed_at, attempt=2)
        check_invariants(inspector, [job_id])


def test_training_child_killed_is_retried(make_stack, chaos_env, tiny_model, tmp_path, inspector):
    with scenario("kill -9 training child") as figures:
        stack = make_stack(chaos_env, tiny_model)
        job_id = submit(stack, tmp_path)
        wait_for_checkpoint(inspector, job_id)
        os.kill(recipe_of(job_id), signal.SIGKILL)
        killed = time.monotonic()
        wait_for(
            lambda: inspector.job(job_id)["attempt"] == 2 and inspector.job(job_id)["status"] == "running",
            60,
            "attempt 2",
        )
        figures["running_again_s"] = round(time.monotonic() - killed, 1)
        job = stack.wait(job_id, timeout=300)
        assert job["status"] == "succeeded", (job["error"], stack.logs())
        messages = [e["message"] for e in inspector.events(job_id)]
        assert any(
            re.search(r"killed by signal (9|SIGKILL)\b", m) and "requeued: attempt 2 of 3" in m for m in messages
        ), messages
        figures["resumed_at_step"] = resumed_at = resumed_step(inspector, job_id, 2)
        check_steps_continue(stack, inspector, job, resumed_at, attempt=2)
        check_invariants(inspector, [job_id])


# Finds the message of job ARGV[2] in the queue's lists (keys matching ARGV[1]) and, if it is there, deletes
# them all, in one step: Redis runs a script atomically, so no worker can take the message in between.
DROP_IF_QUEUED = """
local keys = redis.call('KEYS', ARGV[1])
for _, key in ipairs(keys) do
  for _, message in ipairs(redis.call('LRANGE', key, 0, -1)) do
    if string.find(message, ARGV[2], 1, true) then
      for _, doomed in ipairs(keys) do redis.call('DEL', doomed) end
      return 1
    end
  end
end
return 0
"""


def test_redis_restart_and_dropped_message_lose_no_job(make_stack, chaos_env, tiny_model, tmp_path, inspector):
    import redis

    with scenario("Redis restarted mid-run + a dropped message") as figures:
        stack = make_stack(chaos_env, tiny_model)
        running = submit(stack, tmp_path, n_epochs=6)
        wait_for(lambda: inspector.job(running)["status"] == "running", 120, "the first job to run")
        queue = chaos_env["TUNEQUEUE_QUEUE_NAME"]
        client = redis.Redis(host="127.0.0.1", port=6379)

        def in_redis(job_id: str) -> bool:
            """Its message waits in the queue's lists (validation, training, every priority level), or a worker
            has taken it and not acked it yet (kombu keeps a copy under `unacked` until then)."""
            messages = [m for key in client.keys(f"{queue}*") for m in client.lrange(key, 0, -1)]
            return any(job_id.encode() in m for m in messages + client.hvals("unacked"))

        # Behind the running job: its message waits in Redis, or bounces through the worker's free thread (taken,
        # no free slot within SLOT_WAIT, published again). A restart loses the copy in Redis either way.
        waiting = submit(stack, tmp_path, n_epochs=2)
        wait_for(lambda: in_redis(waiting), 30, "the second job's message")
        figures["redis_down_s"] = round(restart_redis(), 1)  # nothing persisted: the waiting message is gone
        restarted = time.monotonic()
        dropped = submit(stack, tmp_path, n_epochs=2)
        drop_if_queued = client.register_script(DROP_IF_QUEUED)
        # Often polled: a message bouncing through a worker stays in a list only for moments.
        wait_for(lambda: drop_if_queued(args=[f"{queue}*", dropped]), 30, "the third job's message, to drop it", 0.01)

        def republished(job_id: str) -> bool:
            return any("published again" in e["message"] for e in inspector.events(job_id))

        # That message left the broker while no worker held it: only the sweeper can bring the job back, within
        # REPUBLISH_AFTER (3 s) + SWEEP (1 s) of its last change.
        wait_for(lambda: republished(dropped), 30, "the sweeper to publish the dropped job's message again")
        jobs = [stack.wait(job_id, timeout=300) for job_id in (running, waiting, dropped)]
        assert [j["status"] for j in jobs] == ["succeeded"] * 3, ([j["error"] for j in jobs], stack.logs())
        figures["all_done_after_s"] = round(time.monotonic() - restarted, 1)
        # The waiting job's message may have been in a worker's hands at the restart (taken while it waited for
        # a slot): that worker then handed it back itself, and the sweeper had nothing to do for it.
        figures["republished_by_sweeper"] = sum(map(republished, (waiting, dropped)))
        assert figures["republished_by_sweeper"] >= 1
        assert inspector.job(running)["attempt"] == 1  # the running job never noticed
        check_invariants(inspector, [running, waiting, dropped])


def test_postgres_restart_mid_run(make_stack, chaos_env, tiny_model, tmp_path, inspector):
    with scenario("Postgres restarted mid-run") as figures:
        env = {**chaos_env, "TUNEQUEUE_LEASE_SECONDS": "30"}  # the outage is shorter than a lease: no takeover
        stack = make_stack(env, tiny_model)
        job_id = submit(stack, tmp_path)
        wait_for_checkpoint(inspector, job_id)
        out = recipe_output(recipe_of(job_id))
        stop_postgres()
        stopped = time.monotonic()
        try:
            response = wait_for(
                lambda: (r := stack.client.get(f"/v1/fine_tuning/jobs/{job_id}")).status_code == 503 and r,
                30,
                "a 503",
            )
            assert response.headers["Retry-After"] and response.json()["error"]["message"]
            # Training goes on without the database: the recipe saves a later checkpoint on its worker's disk
            # (the worker records it once Postgres is back).
            before = local_checkpoint_step(out)
            assert not os.path.isdir(f"{out}/adapter"), "training ended before the outage: nothing was tested"
            after = wait_for(
                lambda: local_checkpoint_step(out) > before and local_checkpoint_step(out),
                60,
                "training to go on while Postgres is down",
            )
            figures["trained_while_down"] = f"step {before} to {after}"
        finally:
            start_postgres()
        wait_for(
            lambda: stack.client.get(f"/v1/fine_tuning/jobs/{job_id}").status_code == 200, 60, "the API to recover"
        )
        figures["api_503_then_200_after_s"] = round(time.monotonic() - stopped, 1)
        job = stack.wait(job_id, timeout=300)
        assert job["status"] == "succeeded", (job["error"], stack.logs())
        figures["attempts"] = inspector.job(job_id)["attempt"]
        assert figures["attempts"] == 1
        check_steps_continue(stack, inspector, job, 0, attempt=1)  # the steps trained meanwhile are all recorded
        check_invariants(inspector, [job_id])


def test_storage_errors_are_retried(make_stack, chaos_env, tiny_model, tmp_path, inspector, moto_endpoint):
    def flaky(method: str, path: str, nth: int) -> str | None:
        """Every artifact write: first a 503, then a write acknowledged but lost, then through."""
        if method == "PUT" and ("/attempt-" in path or "/files/" in path) and nth <= 2:
            return "error" if nth == 1 else "drop"
        return None

    with scenario("storage errors and lost writes on every upload") as figures:
        proxy = FlakyS3(moto_endpoint, flaky)
        try:
            stack = make_stack({**chaos_env, "TUNEQUEUE_S3_ENDPOINT_URL": proxy.url}, tiny_model)
            job_id = submit(stack, tmp_path, n_epochs=3)
            job = stack.wait(job_id, timeout=300)
            assert job["status"] == "succeeded", (job["error"], stack.logs())
            assert proxy.count("error", "adapter.zip") == 1 and proxy.count("drop", "adapter.zip") == 1
            assert proxy.count("drop", "/checkpoints/") >= 2
            figures["attempts"] = inspector.job(job_id)["attempt"]
            assert figures["attempts"] == 1
            check_invariants(inspector, [job_id])
        finally:
            proxy.close()
            figures["injected_faults"] = len(proxy.injected)


def test_torn_writes_are_detected_and_written_again(
    make_stack, chaos_env, tiny_model, tmp_path, inspector, moto_endpoint
):
    def torn(method: str, path: str, nth: int) -> str | None:
        """The first write of every checkpoint, of its completion marker and of the adapter is stored with
        changed bytes (and no checksum that would give it away)."""
        if method == "PUT" and nth == 1 and ("/checkpoints/" in path or path.endswith("/adapter.zip")):
            return "tear"
        return None

    with scenario("torn writes: every checkpoint and the adapter first stored with changed bytes") as figures:
        proxy = FlakyS3(moto_endpoint, torn)
        try:
            stack = make_stack({**chaos_env, "TUNEQUEUE_S3_ENDPOINT_URL": proxy.url}, tiny_model)
            job_id = submit(stack, tmp_path, n_epochs=3)
            job = stack.wait(job_id, timeout=300)
        finally:
            proxy.close()
        assert job["status"] == "succeeded", (job["error"], stack.logs())
        row = inspector.job(job_id)
        figures["attempts"] = row["attempt"]
        assert figures["attempts"] == 1  # a torn write costs a rewrite, not an attempt
        tears = Counter(path for method, path, what in proxy.injected if (method, what) == ("PUT", "tear"))
        checkpoints = inspector.checkpoints(job_id)
        assert len(checkpoints) >= 2 and any(c["storage_key"] == row["adapter_key"] for c in checkpoints)
        for checkpoint in checkpoints:  # every object read straight from the store, not through the proxy
            key = checkpoint["storage_key"]
            assert tears[inspector.url_path(key)] == 1, f"the first write of {key} was not torn"
            assert inspector.sha256(key) == checkpoint["sha256"], f"{key} is stored torn"
            if checkpoint["resumable"]:
                assert tears[inspector.url_path(f"{key}.complete")] == 1
                assert json.loads(inspector.body(f"{key}.complete"))["sha256"] == checkpoint["sha256"]
        check_invariants(inspector, [job_id])
        figures.update(torn_writes=sum(tears.values()), checkpoints=len(checkpoints))


def test_storage_that_keeps_failing_fails_the_job_clearly(
    make_stack, chaos_env, tiny_model, tmp_path, inspector, moto_endpoint
):
    with scenario("storage keeps failing the adapter upload") as figures:
        proxy = FlakyS3(
            moto_endpoint, lambda method, path, nth: "error" if method == "PUT" and "adapter" in path else None
        )
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
        message = job["error"]["message"]
        assert "storage unavailable while uploading adapter.zip" in message
        assert "giving up after 2 attempt(s)" in message
        assert "tenants/" not in message and "127.0.0.1" not in message  # no key path, no endpoint: those are logged
        assert job["fine_tuned_model"] is None
        check_invariants(inspector, [job_id])
        figures["outcome"] = "failed storage_error after 2 attempts"


def test_frozen_worker_loses_its_job_and_changes_nothing(make_stack, chaos_env, tiny_model, tmp_path, inspector):
    with scenario("worker frozen (SIGSTOP) past its lease") as figures:
        stack = make_stack(chaos_env, tiny_model)
        stack.start_worker("worker-b")
        job_id = submit(stack, tmp_path)
        wait_for_checkpoint(inspector, job_id)
        watch = ProgressWatch(inspector, job_id)
        first_recipe = recipe_of(job_id)
        frozen = worker_of(stack, job_id)
        os.kill(frozen, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            wait_for(
                lambda: inspector.job(job_id)["attempt"] == 2 and inspector.job(job_id)["status"] == "running",
                60,
                "a takeover",
            )
            figures["taken_over_after_s"] = round(time.monotonic() - stopped, 1)
            wait_for(lambda: [p for p in training_processes(job_id) if p != first_recipe], 60, "attempt 2's recipe")
        finally:
            os.kill(frozen, signal.SIGCONT)
        wait_for(lambda: first_recipe not in training_processes(job_id), 30, "the stale worker to stop its recipe")
        job = stack.wait(job_id, timeout=300)
        seen = watch.stop()
        assert job["status"] == "succeeded", (job["error"], stack.logs())
        assert not inspector.job(job_id)["worker"].endswith(f":{frozen}")
        # Attempt 1 wrote nothing after it was reaped: no event, no checkpoint, no progress the job ever showed.
        check_invariants(inspector, [job_id], seen_progress=seen)
        figures["progress_values_seen"] = len(seen)


def test_sigterm_checkpoints_and_requeues(make_stack, chaos_env, tiny_model, tmp_path, inspector):
    with scenario("SIGTERM to the worker") as figures:
        # A drain hands the job back itself: a long lease keeps a busy machine's late renewal from being taken
        # for a lost worker (which would start a third attempt).
        stack = make_stack({**chaos_env, "TUNEQUEUE_LEASE_SECONDS": "30"}, tiny_model)
        job_id = submit(stack, tmp_path)
        wait_for(lambda: len(inspector.events(job_id)) and inspector.job(job_id)["progress"], 120, "training to report")
        owner = worker_of(stack, job_id)
        os.kill(owner, signal.SIGTERM)
        signalled = time.monotonic()
        worker = next(p for p in stack.processes if p.pid == owner)
        assert worker.wait(timeout=60) == 0  # a clean exit, after the job was handed back
        figures["drained_in_s"] = round(time.monotonic() - signalled, 1)
        row = inspector.job(job_id)
        assert row["status"] == "queued", row["status"]
        figures["saved_at_step"] = saved = max(c["step"] for c in inspector.checkpoints(job_id) if c["resumable"])
        assert any("shut down; its state at step" in e["message"] for e in inspector.events(job_id))
        stack.start_worker("worker-next")
        job = stack.wait(job_id, timeout=300)
        assert job["status"] == "succeeded", (job["error"], stack.logs())
        assert resumed_step(inspector, job_id, 2) == saved
        check_steps_continue(stack, inspector, job, saved, attempt=2)
        check_invariants(inspector, [job_id])


def worker_of(stack, job_id: str) -> int:
    """The worker process running `job_id`: an ancestor of its recipe (the parent of a process started for the
    job; the grandparent under torchrun, or of a ready process forked by the worker's fork server)."""
    workers = {p.pid for p in stack.processes}
    pid = recipe_of(job_id)
    while pid not in workers:
        pid = parent_of(pid)
        assert pid > 1, f"no worker of this stack runs {job_id}"
    return pid


def test_two_device_job_pauses_resumes_and_survives_its_worker(make_stack, chaos_env, tiny_model, tmp_path, inspector):
    """Every rank of a 2-device DeepSpeed job saves its ZeRO shard: a pause, its resume, and a kill -9 of the
    worker mid-run each continue from the last saved step, on the same or on another 2-slot worker."""
    with scenario("2-device ZeRO-2 job: pause, resume, kill -9 its worker") as figures:
        stack = make_stack({**chaos_env, "TUNEQUEUE_MAX_ATTEMPTS": "5"}, tiny_model, worker=False)
        for name in ("node-a", "node-b"):
            stack.start_worker(name, "--cpu-slots", "2")
        stack.wait_for_workers(2)
        job_id = submit(stack, tmp_path, n_epochs=5, resources={"devices": 2})
        wait_for_checkpoint(inspector, job_id)
        assert stack.client.post(f"/v1/fine_tuning/jobs/{job_id}/pause").status_code == 200
        paused = wait_for(
            lambda: inspector.job(job_id)["status"] == "paused" and inspector.job(job_id), 120, "the pause"
        )
        figures["paused_at_step"] = saved = max(c["step"] for c in inspector.checkpoints(job_id) if c["resumable"])
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
        figures["running_again_s"] = round(time.monotonic() - killed, 1)
        job = stack.wait(job_id, timeout=400)
        assert job["status"] == "succeeded", (job["error"], stack.logs())
        assert inspector.job(job_id)["attempt"] == last
        figures["resumed_after_kill_at_step"] = resumed_at = resumed_step(inspector, job_id, last)
        assert resumed_at > saved
        check_steps_continue(stack, inspector, job, resumed_at, attempt=last)
        check_invariants(inspector, [job_id])
