"""`make bench-ui`: how long the dashboard's pages take at 10,000 jobs and 1,000,000 events on Postgres.

The same scratch database as `make bench-api` (benchmarks/api_load.py: seeded in bulk, dropped at the end),
one `tunequeue serve` process, a browser-like client signed in through the sign-in form (its session cookie),
and each page requested one at a time on a keep-alive connection: the median and the 95th percentile of 30
requests after one warm-up, measured at the client on loopback, so the figure is the server's time plus a
loopback round trip. The job list is taken at its first page, filtered, and deep in the keyset (page 100);
the job page for a job with 100 events and for the job with the most; the admin overview reads every tenant."""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.api_load import BIG, api_server, cpu_name, scratch_database, seed

TARGET_MS = 100.0


def admin_key(url: str) -> str:
    from sqlalchemy.orm import Session

    from shared.auth.service import create_key
    from shared.db import make_engine

    engine = make_engine(url)
    with Session(engine) as session:
        secret = create_key(session, BIG, admin=True)[1]
        session.commit()
    engine.dispose()
    return secret


def signed_in(base: str, key: str) -> httpx.Client:
    client = httpx.Client(base_url=base, timeout=30)
    answer = client.post("/ui/sign-in", data={"api_key": key, "next": "/ui/jobs"})
    if answer.status_code != 303 or "tq_session" not in client.cookies:
        raise SystemExit(f"sign-in failed: HTTP {answer.status_code}\n{answer.text[:500]}")
    return client


def timed(client: httpx.Client, path: str, repeats: int) -> tuple[float, float]:
    client.get(path).raise_for_status()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        response = client.get(path)
        timings.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    timings.sort()
    return statistics.median(timings), timings[int(0.95 * (len(timings) - 1))]


def deep_cursor(client: httpx.Client, pages: int) -> str:
    """The `after` of the job list's page number `pages`, found by following the pages' own links."""
    path = "/ui/jobs"
    for _ in range(pages - 1):
        text = client.get(path).text
        marker = 'href="/ui/jobs?after='
        start = text.index(marker) + len('href="')
        path = text[start : text.index('"', start)].replace("&amp;", "&")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ui_pages", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs of the signed-in tenant")
    parser.add_argument("--events", type=int, default=1_000_000, help="events over those jobs")
    parser.add_argument("--repeats", type=int, default=30, help="requests per page")
    args = parser.parse_args(argv)
    from shared import migrate

    with scratch_database() as url, tempfile.TemporaryDirectory() as scratch:
        migrate.upgrade(url=url)
        seeded = seed(url, args.jobs, args.events)
        key = admin_key(url)
        with api_server(url, 1, Path(scratch)) as base:
            client = signed_in(base, key)
            pages = {
                "jobs, first page": "/ui/jobs",
                "jobs, status filter": "/ui/jobs?status=succeeded",
                "jobs, model filter": "/ui/jobs?model=smollm2-135m-instruct",
                "jobs, page 100": deep_cursor(client, 100),
                "job page (100 events)": f"/ui/jobs/{seeded.job_ids[0]}",
                "job page (the busiest job)": f"/ui/jobs/{seeded.busy_job}",
                "files": "/ui/files",
                "models": "/ui/models",
                "admin overview": "/ui/admin",
                "admin, all jobs": "/ui/admin/jobs",
                "admin, keys": "/ui/admin/keys",
            }
            figures = {name: timed(client, path, args.repeats) for name, path in pages.items()}
            client.close()
    print(f"\nCPU: {cpu_name()}; one API process; {args.jobs:,} jobs and {args.events:,} events on Postgres")
    print(f"| page | median ms | p95 ms | under {TARGET_MS:.0f} ms |")
    print("|---|---:|---:|---|")
    for name, (median, p95) in figures.items():
        print(f"| {name} | {median:.1f} | {p95:.1f} | {'yes' if p95 < TARGET_MS else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
