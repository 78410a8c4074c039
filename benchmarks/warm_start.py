"""`make bench-warm`: where a job's seconds go between its submission and its first training step, with a
cold worker (no ready process, empty model and dataset caches) and a warm one (a ready process, the base
model and the tokenised data cached), and the job's wall time against the bare recipe on the same data. The
warm worker runs two jobs one after the other, with its ready processes forked from its fork server and then
spawned as interpreters of their own (TUNEQUEUE_WARM_RUNTIME_FORK=false).

The stack is real: Postgres and Redis on loopback, S3 on a moto server started here, the API and one
`tunequeue worker` as processes (tests/support.py's Stack). The base is SmolLM2-135M-Instruct. Phases come
from the job's status as polled every 20 ms, and from the worker's `startup` log line (worker/runner/startup.py)."""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from benchmarks.run import ROOT, base_model, sample_lines
from tests.support import Stack, free_port

PG_ADMIN_URL = os.environ.get("TUNEQUEUE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
MODEL_ID = "smollm2-135m"
POLL_SECONDS = 0.02


def cpu_name() -> str:
    info = Path("/proc/cpuinfo").read_text()
    name = re.search(r"model name\s*:\s*(.+)", info)
    bf16 = "avx512_bf16" in info
    model = name.group(1).strip() if name else "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, avx512_bf16={'yes' if bf16 else 'no'}"


class Services:
    """A fresh Postgres database, a moto S3 server with a bucket, and a queue name of their own."""

    def __enter__(self) -> "Services":
        import boto3
        import psycopg

        self.database = f"tunequeue_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{self.database}"')
        port = free_port()
        self.moto = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.endpoint = f"http://127.0.0.1:{port}"
        wait_until(lambda: reachable(self.endpoint), 30, "moto's S3 server")
        os.environ.update(S3_ENV)
        self.bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=self.bucket)
        return self

    def env(self, data_dir: Path) -> dict[str, str]:
        return {
            **S3_ENV,
            "TUNEQUEUE_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.database}",
            "TUNEQUEUE_BROKER_URL": "redis://127.0.0.1:6379/0",
            "TUNEQUEUE_QUEUE_NAME": f"tq-bench-{uuid.uuid4().hex[:8]}",
            "TUNEQUEUE_STORAGE_URL": f"s3://{self.bucket}/tunequeue",
            "TUNEQUEUE_S3_ENDPOINT_URL": self.endpoint,
            "TUNEQUEUE_DATA_DIR": str(data_dir),
            "TUNEQUEUE_METRICS_INTERVAL_SECONDS": "0.5",
            "TUNEQUEUE_CANCEL_POLL_SECONDS": "0.2",
            "TUNEQUEUE_HEARTBEAT_SECONDS": "1",
        }

    def __exit__(self, *exc_info) -> None:
        import psycopg

        self.moto.terminate()
        self.moto.wait(timeout=10)
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')


def reachable(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
        return True
    except httpx.TransportError:
        return False


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


def ready_process_loaded(worker_pid: int) -> bool:
    """A ready recipe process of this worker has finished loading: its CPU time stands still for a second."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if args[3:4] == [b"--ready"] and worker_pid in (int(stat[1]), parent_of(int(stat[1]))):  # or its fork server's
            before = int(stat[11]) + int(stat[12])
            time.sleep(1)
            after = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            return int(after[11]) + int(after[12]) == before
    return False


def parent_of(pid: int) -> int:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return 0


def submit_and_follow(stack: Stack, file_id: str, hyperparameters: dict) -> dict:
    """Submit, then poll the job's status until it ends: when each status was first seen."""
    seen: dict[str, float] = {}
    submitted = time.time()
    job = stack.create_job(model=MODEL_ID, training_file=file_id, seed=7, hyperparameters=hyperparameters)
    seen["accepted"] = time.time()
    while True:
        status = stack.client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"]
        seen.setdefault(status, time.time())
        if status in ("succeeded", "failed", "cancelled"):
            break
        # Finely until the claim; then gently: a poll costs the API CPU that the training would miss.
        time.sleep(POLL_SECONDS if status in ("validating_files", "queued") else 0.25)
    if status != "succeeded":
        raise RuntimeError(f"job {job['id']} {status}:\n{stack.logs()}")
    return {"id": job["id"], "submitted": submitted, "seen": seen}


def startup_line(stack: Stack, job_id: str) -> dict:
    for line in (stack.logdir / "worker.log").read_text().splitlines():
        if "startup {" in line and job_id in line:
            return json.loads(line.split("startup ", 1)[1])
    raise RuntimeError(f"no startup line for {job_id} in the worker's log")


def first_step_seconds(stack: Stack, job_id: str) -> float:
    """How long step 1 itself took (its tokens over its tokens per second)."""
    events = stack.client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    step = next(e["data"] for e in events if e["type"] == "metrics" and e["data"]["step"] == 1)
    return step["trained_tokens"] / step["tokens_per_second"]


def phases(run: dict, startup: dict, step_seconds: float) -> dict:
    """Seconds from submission to each point, and each phase's own length."""
    submitted, seen = run["submitted"], run["seen"]
    at = {"queued (dispatched, data validated)": seen.get("queued", seen["running"]) - submitted}
    claimed = startup["claimed_at"] - submitted
    at["claimed"] = claimed
    for point, seconds in startup["marks"]:
        at[point] = claimed + seconds
    first = at[next(p for p in at if p.startswith("step 1"))]
    at["first step begins"] = first - step_seconds
    at["first step reported"] = first
    at["succeeded"] = seen["succeeded"] - submitted
    return at


def bare_recipe(model: Path, data: Path, hyperparameters: dict, out: Path) -> float:
    """`python -m worker.training` alone on the same base, data and settings; wall seconds."""
    config = out / "config.json"
    out.mkdir(parents=True)
    fields = {"base_model_path": str(model), "train_file": str(data), "seed": 7, **hyperparameters}
    config.write_text(json.dumps(fields))
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "worker.training", "--config", str(config), "--out", str(out / "out")],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    return time.monotonic() - started


def run_on_worker(services: Services, data_dir: Path, logs: Path, data: Path, hyperparameters: dict, *, warm: bool,
                  import_model: bool, fork: bool = True, jobs: int = 1) -> list[tuple[dict, dict]]:  # fmt: skip
    """`jobs` jobs one after the other (each submitted once the one before has succeeded): their phases."""
    env = services.env(data_dir) | {"TUNEQUEUE_WARM_RUNTIMES": "1" if warm else "0"}
    env["TUNEQUEUE_WARM_RUNTIME_FORK"] = "true" if fork else "false"
    stack = Stack(env, logs)
    stack.cli("db", "upgrade")
    if import_model:
        stack.cli("models", "import-hf", str(base_model()), "--name", MODEL_ID)
    try:
        stack.start()
        stack.wait_for_workers(1)
        if warm:
            worker = next(p for p in stack.processes if "worker" in p.args)
            wait_until(lambda: ready_process_loaded(worker.pid), 180, "the ready process to load")
        file_id = stack.upload(data)["id"]
        results = []
        for _ in range(jobs):
            run = submit_and_follow(stack, file_id, hyperparameters)
            startup = startup_line(stack, run["id"])
            results.append((phases(run, startup, first_step_seconds(stack, run["id"])), startup))
        return results
    finally:
        stack.stop()


def print_table(columns: dict[str, dict]) -> None:
    print("| seconds after submission | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    points = list(dict.fromkeys(point for runs in columns.values() for point in runs))
    for point in points:
        cells = [f"{runs[point]:.2f}" if point in runs else "–" for runs in columns.values()]
        print(f"| {point} | " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.warm_start", description=__doc__)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    hyperparameters = {"n_epochs": 1, "batch_size": args.batch_size}
    print(f"CPU: {cpu_name()}; SmolLM2-135M-Instruct, {args.examples} sample examples, batch {args.batch_size}")
    with tempfile.TemporaryDirectory(prefix="tunequeue-bench-warm-") as scratch, Services() as services:
        root = Path(scratch)
        data = root / "train.jsonl"
        data.write_text("\n".join(sample_lines(args.examples)) + "\n")
        node = root / "node"  # one worker node: its model and dataset caches outlive the cold worker
        [cold] = run_on_worker(services, node, root / "cold", data, hyperparameters, warm=False, import_model=True)
        # Two jobs one after the other on a warm worker: the second finds the replacement of the first's ready
        # process, forked from the fork server or (spawn) an interpreter loading the libraries once the first ended.
        forked = run_on_worker(services, node, root / "fork", data, hyperparameters, warm=True, import_model=False,
                               jobs=2)  # fmt: skip
        spawned = run_on_worker(services, node, root / "spawn", data, hyperparameters, warm=True,
                                import_model=False, fork=False, jobs=2)  # fmt: skip
        bare = bare_recipe(base_model(), data, hyperparameters, root / "bare")
    runs = {
        "cold worker": cold,
        "warm (fork server)": forked[0],
        "next job (fork server)": forked[1],
        "warm (spawned ready process)": spawned[0],
        "next job (spawned)": spawned[1],
    }
    print_table({name: run[0] for name, run in runs.items()})
    print()
    for name, (_, startup) in runs.items():
        print(f"{name} startup: {json.dumps(startup['marks'])}")
    print(f"\nbare recipe (`python -m worker.training`, imports included): {bare:.1f} s")
    for name, (run, _) in runs.items():
        wall = run["succeeded"]
        print(f"{name}, submit -> succeeded: {wall:.1f} s = {wall / bare:.2f}x the bare recipe")
    return 0


if __name__ == "__main__":
    sys.exit(main())
