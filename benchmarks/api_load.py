"""`make bench-api`: the API under polling load, on Postgres with 10,000 jobs and 1,000,000 events.

A scratch Postgres database is created, migrated and seeded in bulk (INSERT ... SELECT generate_series), then
`tunequeue serve --workers N` runs on loopback with production settings (Postgres, Redis) and wrk drives it:
GET of a job, a page of its events, the job list, the job list filtered by metadata, and job creation. The
list's single-request latency is also taken for a tenant with 100 jobs and one with 10,000: a list bounded in
SQL costs the same for both. The scratch database is dropped at the end, whatever happens.

wrk is the load tool (`apt-get install -y wrk`, `brew install wrk`). Without it, a Python load generator
(threads, keep-alive connections) stands in; it needs more CPU per request than wrk, so its figures are lower
on the same machine, and the table says which tool measured them."""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("TUNEQUEUE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TUNEQUEUE_BENCH_REDIS", "redis://127.0.0.1:6379/0")
BIG, SMALL, WRITER = "bench", "small", "writer"  # tenants: 10,000 jobs, 100 jobs, the one that creates jobs
EPOCH = 1_780_000_000


@dataclass(frozen=True)
class Seeded:
    big_key: str
    small_key: str
    writer_key: str
    job_ids: list[str]  # a sample of the big tenant's jobs, polled at random
    busy_job: str  # mid-list: the cursor of the explained job page, and the job whose event pages are explained
    training_file: str


@dataclass(frozen=True)
class LoadResult:
    name: str
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int
    tool: str


# --- the scratch database ---------------------------------------------------------------------------------


@contextmanager
def scratch_database() -> Iterator[str]:
    import psycopg

    name = f"tunequeue_bench_api_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        print(f"dropped the scratch database {name}", file=sys.stderr)


def psycopg_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


# Every seeded job is finished (so that none counts against the tenant's active-job limit), with the
# hyperparameters and options a real job has; created_at repeats every 4 jobs, so pagination meets ties.
SEED_JOBS = """
INSERT INTO jobs (id, tenant, status, model, training_file, seed, hyperparameters, training_options,
                  user_metadata, fine_tuned_model, trained_tokens, result_files, attempt, priority, devices,
                  cancel_requested, pause_requested, progress, created_at, started_at, finished_at, updated_at)
SELECT 'ftjob-' || %(prefix)s || lpad(to_hex(g), 16, '0'), %(tenant)s, 'succeeded', 'smollm2-135m-instruct',
       %(file)s, g, '{"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0}',
       '{"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "max_length": 512}',
       json_build_object('team', 'team-' || (g %% 10), 'run', 'run-' || g),
       'ft:smollm2-135m-instruct::ftjob-' || %(prefix)s || lpad(to_hex(g), 16, '0'), 52000, '[]', 1, 0, 1,
       false, false, '{"step": 120, "total_steps": 120}', %(epoch)s + g / 4, %(epoch)s + g / 4 + 5,
       %(epoch)s + g / 4 + 600, %(epoch)s + g / 4 + 600
FROM generate_series(1, %(count)s) AS g
"""

# Events spread over every job of the tenant, 100 per job (the busy job gets the rest), each with metrics.
SEED_EVENTS = """
INSERT INTO job_events (public_id, job_id, attempt, created_at, level, type, message, data)
SELECT 'ftevent-' || substr(md5(g::text), 1, 24), j.id, 1, j.created_at + g %% 600, 'info', 'metrics',
       'Step ' || g || ': training loss=1.234', json_build_object('step', g, 'train_loss', 1.234)
FROM generate_series(1, %(count)s) AS g
JOIN (SELECT id, created_at, row_number() OVER (ORDER BY id) - 1 AS n FROM jobs WHERE tenant = %(tenant)s) AS j
  ON j.n = (g - 1) %% %(jobs)s
"""


def seed(url: str, jobs: int, events: int) -> Seeded:
    import psycopg

    keys = create_keys(url)
    with psycopg.connect(psycopg_url(url), autocommit=True) as connection:
        insert_base_model(connection)
        training_file = insert_file(connection)
        for tenant, count in ((BIG, jobs), (SMALL, 100)):
            connection.execute(
                SEED_JOBS,
                {"prefix": tenant[:2], "tenant": tenant, "file": training_file, "epoch": EPOCH, "count": count},
            )
        connection.execute(SEED_EVENTS, {"count": events, "tenant": BIG, "jobs": jobs})
        # As autovacuum leaves a live database: statistics current, the GIN index's pending list merged.
        connection.execute("VACUUM ANALYZE")
        job_ids = [row[0] for row in connection.execute("SELECT id FROM jobs WHERE tenant = %s LIMIT 1000", [BIG])]
        middle = connection.execute(
            "SELECT id FROM jobs WHERE tenant = %s ORDER BY created_at DESC, id DESC OFFSET %s LIMIT 1",
            [BIG, jobs // 2],
        ).fetchone()[0]
    return Seeded(*keys, job_ids=job_ids, busy_job=middle, training_file=training_file)


def insert_base_model(connection) -> None:
    """The base model that created jobs name: creation reads its row, never its weights."""
    connection.execute(
        "INSERT INTO base_models (id, source, storage_prefix, architecture, parameters, files, linear_modules, "
        "created_at) VALUES ('smollm2-135m-instruct', 'bench', 'unused', 'LlamaForCausalLM', 134515008, '{}', "
        '\'["q_proj", "k_proj", "v_proj", "o_proj"]\', %s)',
        [EPOCH],
    )


def insert_file(connection) -> str:
    """The training file that created jobs name: only its row is read at creation."""
    file_id = "file-bench0000000000000001"
    connection.execute(
        "INSERT INTO files (id, tenant, filename, purpose, bytes, sha256, storage_key, line_count, status, "
        "created_at, deleted) VALUES (%s, %s, 'train.jsonl', 'fine-tune', 1000, %s, 'unused', 64, 'processed', "
        "%s, false)",
        [file_id, WRITER, "0" * 64, EPOCH],
    )
    return file_id


def create_keys(url: str) -> tuple[str, str, str]:
    from sqlalchemy.orm import Session

    from shared.auth.service import create_key
    from shared.db import make_engine

    engine = make_engine(url)
    with Session(engine) as session:
        secrets = tuple(create_key(session, tenant)[1] for tenant in (BIG, SMALL, WRITER))
        session.commit()
    engine.dispose()
    return secrets  # type: ignore[return-value]


# The page queries the list routes send (shared/jobs/service.py), with the seeded data's values: the plans
# show which index answers each, at the seeded size.
PAGE_QUERIES = {
    "jobs, first page": "SELECT * FROM jobs WHERE tenant = %(tenant)s ORDER BY created_at DESC, id DESC LIMIT 21",
    "jobs, after a cursor": "SELECT * FROM jobs WHERE tenant = %(tenant)s AND (created_at, id) < (%(created)s, "
    "%(job)s) ORDER BY created_at DESC, id DESC LIMIT 21",
    "jobs, metadata filter": "SELECT * FROM jobs WHERE tenant = %(tenant)s AND CAST(user_metadata AS JSONB) @> "
    '\'{"team": "team-3"}\'::jsonb ORDER BY created_at DESC, id DESC LIMIT 21',
    "jobs, rare metadata value": "SELECT * FROM jobs WHERE tenant = %(tenant)s AND CAST(user_metadata AS JSONB) "
    '@> \'{"run": "run-77"}\'::jsonb ORDER BY created_at DESC, id DESC LIMIT 21',
    "events, first page": "SELECT * FROM job_events WHERE job_id = %(job)s ORDER BY seq DESC LIMIT 21",
    "events, after a cursor": "SELECT * FROM job_events WHERE job_id = %(job)s AND seq < (SELECT seq FROM "
    "job_events WHERE job_id = %(job)s AND public_id = %(event)s) ORDER BY seq DESC LIMIT 21",
}


def explain_pages(url: str, seeded: Seeded) -> dict[str, str]:
    """Each page query's plan, one line per node, with its measured time."""
    import psycopg

    with psycopg.connect(psycopg_url(url)) as connection:
        job = seeded.busy_job
        created = connection.execute("SELECT created_at FROM jobs WHERE id = %s", [job]).fetchone()[0]
        event = connection.execute(
            "SELECT public_id FROM job_events WHERE job_id = %s ORDER BY seq DESC OFFSET 5 LIMIT 1", [job]
        ).fetchone()[0]
        values = {"tenant": BIG, "job": job, "created": created, "event": event}
        plans = {}
        for name, query in PAGE_QUERIES.items():
            rows = connection.execute("EXPLAIN (ANALYZE, COSTS OFF) " + query, values).fetchall()
            plans[name] = "\n".join(row[0] for row in rows)
    return plans


# --- the server -------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def api_server(url: str, processes: int, scratch: Path) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "TUNEQUEUE_DATABASE_URL": url,
        "TUNEQUEUE_BROKER_URL": REDIS_URL,
        "TUNEQUEUE_QUEUE_NAME": f"tq-bench-{uuid.uuid4().hex[:8]}",
        "TUNEQUEUE_DATA_DIR": str(scratch),
        # creation is measured for throughput: the per-tenant job limits would answer 429 after the first 100
        "TUNEQUEUE_MAX_ACTIVE_JOBS_PER_TENANT": "1000000",
        "TUNEQUEUE_MAX_QUEUED_JOBS_PER_TENANT": "1000000",
    }
    command = [sys.executable, "-m", "tunequeue", "serve", "--port", str(port), "--workers", str(processes)]
    log = open(scratch / "api.log", "wb")
    server = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base, server, scratch / "api.log")
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        purge_queue(env["TUNEQUEUE_QUEUE_NAME"])


def wait_until_up(base: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the API server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the API server did not start within 60 s:\n{log.read_text()[-3000:]}")


def purge_queue(queue: str) -> None:
    """Created jobs were published for validation; no worker reads this queue, so its messages go."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{queue}*"):
        client.delete(key)


# --- load -------------------------------------------------------------------------------------------------

WRK_SCRIPT = """
local paths = {%(paths)s}
local method, body = %(method)s, %(body)s
wrk.headers["Authorization"] = "Bearer %(key)s"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local path = paths[math.random(#paths)]
  if method == "GET" then return wrk.format("GET", path) end
  return wrk.format(method, path, nil, body)
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %%f %%f %%f %%d\\n", summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.timeout))
end
"""


@dataclass(frozen=True)
class Target:
    name: str
    paths: list[str]
    key: str
    method: str = "GET"
    body: str = ""


def run_wrk(base: str, target: Target, seconds: int, connections: int, threads: int) -> LoadResult:
    paths = ", ".join(json.dumps(path) for path in target.paths)
    values = {"paths": paths, "method": json.dumps(target.method), "body": json.dumps(target.body), "key": target.key}
    script = WRK_SCRIPT % values
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
    try:
        command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "-s", handle.name, base]
        output = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60).stdout
    finally:
        os.unlink(handle.name)
    found = re.search(r"RESULT (\S+) (\S+) (\S+) (\d+)", output)
    if not found:
        raise SystemExit(f"wrk printed no result:\n{output}")
    rate, p50, p99, errors = found.groups()
    return LoadResult(target.name, float(rate), float(p50), float(p99), int(errors), "wrk")


def run_python_load(base: str, target: Target, seconds: int, connections: int) -> LoadResult:
    """The stand-in for wrk: one thread per connection, each with its own keep-alive client."""
    import random

    latencies: list[float] = []
    errors = [0]
    stop_at = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {target.key}", "Content-Type": "application/json"}

    def connection() -> None:
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                response = client.request(target.method, random.choice(target.paths), content=target.body or None)
                latencies.append(time.perf_counter() - started)
                errors[0] += response.status_code >= 400

    threads = [threading.Thread(target=connection) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies.sort()
    p50, p99 = (latencies[int(len(latencies) * q)] * 1000 for q in (0.50, 0.99))
    return LoadResult(target.name, len(latencies) / seconds, p50, p99, errors[0], "python")


def single_request_ms(base: str, path: str, key: str, repeats: int = 30) -> float:
    """Median of sequential requests on one keep-alive connection: the latency with nothing else running."""
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        client.get(path).raise_for_status()
        timings = []
        for _ in range(repeats):
            started = time.perf_counter()
            client.get(path).raise_for_status()
            timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def targets(seeded: Seeded) -> list[Target]:
    jobs = [f"/v1/fine_tuning/jobs/{job_id}" for job_id in seeded.job_ids]
    create = json.dumps({"model": "smollm2-135m-instruct", "training_file": seeded.training_file})
    return [
        Target("GET /v1/fine_tuning/jobs/{id}", jobs, seeded.big_key),
        Target(
            "GET /v1/fine_tuning/jobs/{id}/events?limit=20",
            [f"{path}/events?limit=20" for path in jobs],
            seeded.big_key,
        ),
        Target("GET /v1/fine_tuning/jobs?limit=20", ["/v1/fine_tuning/jobs?limit=20"], seeded.big_key),
        Target(
            "GET /v1/fine_tuning/jobs?limit=20&metadata[team]=team-3",
            ["/v1/fine_tuning/jobs?limit=20&metadata[team]=team-3"],
            seeded.big_key,
        ),
        Target("POST /v1/fine_tuning/jobs", ["/v1/fine_tuning/jobs"], seeded.writer_key, "POST", create),
    ]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_report(args, results: list[LoadResult], single: dict[str, float]) -> None:
    print(f"\nCPU: {cpu_name()} ({os.cpu_count()} logical cores, shared by the API, Postgres and the load tool)")
    print(
        f"API: `tunequeue serve --workers {args.processes}` ({args.processes} processes; sync routes run on "
        "each process's thread pool of 40 threads)"
    )
    print(
        f"data: {args.jobs:,} jobs and {args.events:,} events on Postgres; load: {args.connections} connections, "
        f"{args.seconds} s per row, after {args.warmup} s of the same load not counted\n"
    )
    print("| request | req/s | p50 ms | p99 ms | errors | tool |")
    print("|---|---:|---:|---:|---:|---|")
    for row in results:
        print(
            f"| `{row.name}` | {row.requests_per_second:,.0f} | {row.p50_ms:.1f} | {row.p99_ms:.1f} | "
            f"{row.errors} | {row.tool} |"
        )
    print("\nOne request at a time (median of 30):")
    print(f"| list | 100 jobs | {args.jobs:,} jobs | ratio |")
    print("|---|---:|---:|---:|")
    for name in ("limit=20", "limit=20, metadata filter", "limit=100"):
        small, big = single[f"small {name}"], single[f"big {name}"]
        print(f"| `jobs?{name}` | {small:.1f} ms | {big:.1f} ms | {big / small:.2f}x |")


def measure(args, seeded: Seeded, base: str) -> tuple[list[LoadResult], dict[str, float]]:
    single = {}
    for tenant, key in (("small", seeded.small_key), ("big", seeded.big_key)):
        single[f"{tenant} limit=20"] = single_request_ms(base, "/v1/fine_tuning/jobs?limit=20", key)
        single[f"{tenant} limit=20, metadata filter"] = single_request_ms(
            base, "/v1/fine_tuning/jobs?limit=20&metadata[team]=team-3", key
        )
        single[f"{tenant} limit=100"] = single_request_ms(base, "/v1/fine_tuning/jobs?limit=100", key)
    if shutil.which("wrk") is None:
        print("wrk not found (apt-get install -y wrk): using the Python load generator", file=sys.stderr)
    chosen = [target for target in targets(seeded) if not args.only or any(part in target.name for part in args.only)]
    return [load(args, base, target) for target in chosen], single


def load(args, base: str, target: Target) -> LoadResult:
    """One row: `--warmup` seconds of the same load, not counted (each process opens its pooled connections,
    fills its caches and has its statements prepared, as a server that has been polled for a while has), then
    `--seconds` measured."""
    for seconds in (args.warmup, args.seconds):
        if seconds <= 0:
            continue
        if shutil.which("wrk"):
            result = run_wrk(base, target, seconds, args.connections, args.wrk_threads)
        else:
            result = run_python_load(base, target, seconds, args.connections)
    print(f"measured {target.name}", file=sys.stderr)
    return result


def process_counts(args) -> list[int]:
    if args.scaling is None:
        return sorted({1, args.processes, args.processes * 2})
    return sorted({int(count) for count in args.scaling.split(",") if int(count) > 0})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.api_load", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs of the polled tenant")
    parser.add_argument("--events", type=int, default=1_000_000, help="events over those jobs")
    parser.add_argument("--processes", type=int, default=2, help="API processes (`tunequeue serve --workers`)")
    parser.add_argument("--connections", type=int, default=8, help="connections the load tool keeps open")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk's threads")
    parser.add_argument("--seconds", type=int, default=10, help="seconds of load per request kind")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of the same load before each, not counted")
    parser.add_argument(
        "--only",
        action="append",
        metavar="TEXT",
        help="load only the requests whose name contains TEXT, e.g. --only 'jobs/{id}' (repeatable; default: all)",
    )
    parser.add_argument(
        "--scaling",
        default=None,
        metavar="N,N,...",
        help="API process counts for the GET-a-job table (default: 1, --processes and twice that; 0: skip it)",
    )
    args = parser.parse_args(argv)
    from shared import migrate

    with scratch_database() as url, tempfile.TemporaryDirectory() as scratch:
        started = time.monotonic()
        migrate.upgrade(url=url)
        seeded = seed(url, args.jobs, args.events)
        print(
            f"seeded {args.jobs:,} jobs and {args.events:,} events in {time.monotonic() - started:.0f} s",
            file=sys.stderr,
        )
        plans = explain_pages(url, seeded)
        with api_server(url, args.processes, Path(scratch)) as base:
            results, single = measure(args, seeded, base)
        by_processes = {}
        for processes in process_counts(args):
            with api_server(url, processes, Path(scratch)) as base:
                by_processes[processes] = load(args, base, targets(seeded)[0])
    print_report(args, results, single)
    print("\n`GET /v1/fine_tuning/jobs/{id}` by number of API processes (same data, same load):")
    print("| processes | req/s | p50 ms | p99 ms | errors |")
    print("|---:|---:|---:|---:|---:|")
    for processes, row in by_processes.items():
        print(f"| {processes} | {row.requests_per_second:,.0f} | {row.p50_ms:.1f} | {row.p99_ms:.1f} | {row.errors} |")
    print("\nPlans of the page queries (EXPLAIN ANALYZE, Postgres):")
    for name, plan in plans.items():
        print(f"-- {name}\n{plan}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
