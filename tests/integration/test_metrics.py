"""/metrics on real processes. `tunequeue serve --workers 2`: whichever process a scrape reaches answers for
both (their counts meet in a folder the server makes and removes). `check_after_one_job` reads a scrape after
a job has run on the real stack; tests/integration/test_webhooks.py calls it once its job and deliveries are
done, so that no stack is started for metrics alone."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.multiprocess import MultiProcessCollector

from tests.faults import wait_for
from tests.scraped import Scrape
from tests.support import CLI_END, CLI_MANY, ROOT, free_port, key_command

JOB_ROUTE = "/v1/fine_tuning/jobs/{job_id}"


def scrape(client: httpx.Client, key: str) -> Scrape:
    response = client.get("/metrics", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return Scrape(response.text)


def requests(scrape: Scrape, route: str, status: int, method: str = "GET") -> float:
    return scrape.value("tunequeue_http_requests_total", method=method, route=route, status=str(status))


def check_after_one_job(stack, job: dict, *, delivered: int, failed_attempts: int) -> None:
    """The scrape agrees with the API's own figures after `job` succeeded: jobs by status, the job's duration
    and wait, its tokens, the worker's slots, the webhook deliveries, and the requests made here, each under its
    route's template. Admin keys only."""
    tenant_key = stack.client.post("/admin/keys", json={"tenant": "metrics-reader"}).json()["secret"]
    assert stack.client.get("/metrics", headers={"Authorization": ""}).status_code == 401
    assert stack.client.get("/metrics", headers={"Authorization": f"Bearer {tenant_key}"}).status_code == 403

    # A worker reports its slots in heartbeats: the one after the job ended frees its slot.
    wait_for(
        lambda: all(
            w["slots"]["free"] == w["slots"]["total"] for w in stack.client.get("/admin/overview").json()["workers"]
        ),
        60,
        "the worker to report its slot free",
    )
    before = scrape(stack.client, stack.key)
    for _ in range(3):
        assert stack.client.get(f"/v1/fine_tuning/jobs/{job['id']}").status_code == 200
    assert stack.client.get("/v1/fine_tuning/jobs/ftjob-000000000000000000000000").status_code == 404
    assert stack.client.get(f"/no/such/path/{job['id']}").status_code == 404
    overview = stack.client.get("/admin/overview").json()
    after = scrape(stack.client, stack.key)

    assert requests(after, JOB_ROUTE, 200) - requests(before, JOB_ROUTE, 200) == 3
    assert requests(after, JOB_ROUTE, 404) - requests(before, JOB_ROUTE, 404) == 1
    assert requests(after, "unmatched", 404) - requests(before, "unmatched", 404) == 1
    assert requests(after, "/metrics", 200) - requests(before, "/metrics", 200) == 1  # the first scrape
    assert requests(before, "/metrics", 401) >= 1 and requests(before, "/metrics", 403) >= 1
    assert requests(after, "/v1/files", 200, "POST") >= 1 and requests(after, "/v1/fine_tuning/jobs", 200, "POST") == 1
    routes = after.label_values("tunequeue_http_requests_total", "route")
    assert not [route for route in routes if job["id"] in route], routes  # templates, never ids
    assert after.check_histograms() > len(routes)
    latency = "tunequeue_http_request_duration_seconds_count"
    assert after.value(latency, method="GET", route=JOB_ROUTE, status="200") == requests(after, JOB_ROUTE, 200)

    for status, count in overview["jobs_by_status"].items():
        assert after.value("tunequeue_jobs", status=status) == count, status
    assert after.value("tunequeue_jobs", status="succeeded") == 1
    duration, wait = "tunequeue_job_duration_seconds", "tunequeue_job_queue_wait_seconds"
    assert after.value(f"{duration}_count", status="succeeded") == 1 and after.value(f"{wait}_count") == 1
    ran, waited = job["finished_at"] - job["created_at"], after.value(f"{wait}_sum")
    assert 0 <= after.value(f"{duration}_sum", status="succeeded") <= ran and 0 <= waited <= ran
    assert after.value("tunequeue_trained_tokens_total") == job["trained_tokens"] > 0

    [worker] = overview["workers"]
    slots = worker["slots"]
    assert after.value("tunequeue_workers") == 1
    assert after.value("tunequeue_worker_slots", worker=worker["hostname"], kind=slots["kind"]) == slots["total"] >= 1
    assert after.value("tunequeue_worker_slots_free", worker=worker["hostname"], kind=slots["kind"]) == slots["free"]
    assert after.value("tunequeue_queue_messages") == overview["queue_depth"] == 0
    assert after.value("tunequeue_broker_up") == 1

    assert after.value("tunequeue_webhook_deliveries", status="delivered") == delivered
    assert after.value("tunequeue_webhook_deliveries", status="failed") == 0
    assert after.value("tunequeue_webhook_failed_attempts") == failed_attempts


def counted_per_process(folder: Path) -> dict[str, float]:
    """Requests to /healthz each API process wrote to the shared folder, by the pid in its file name."""
    found = {}
    for path in folder.glob("counter_*.db"):
        pid = path.stem.removeprefix("counter_")
        samples = [s for family in MultiProcessCollector.merge([str(path)]) for s in family.samples]
        found[pid] = sum(s.value for s in samples if s.labels.get("route") == "/healthz")
    return found


def test_a_scrape_answers_for_every_serve_process(embedded_env, tmp_path):
    scratch = tmp_path / "tmp"  # the server's temporary folder: its metrics folder is made, then removed, here
    scratch.mkdir()
    env = {**os.environ, **embedded_env, "TMPDIR": str(scratch), "PYTHONUNBUFFERED": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    commands = [["db", "upgrade"], key_command("ops", admin=True)]
    prepared = subprocess.run(
        [sys.executable, "-c", CLI_MANY, json.dumps(commands)], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert prepared.returncode == 0, prepared.stderr
    key, port = prepared.stdout.split(CLI_END)[1].strip(), free_port()
    base = f"http://127.0.0.1:{port}"
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "tunequeue", "serve", "--workers", "2", "--port", str(port)],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_until_up(base, server, tmp_path / "serve.log")
        [folder] = scratch.glob("tunequeue-metrics-*")
        # A new connection per request, so that both processes take some (each accepts from the same socket).
        sent = 1  # wait_until_up's
        while sent < 400 and len([n for n in counted_per_process(folder).values() if n]) < 2:
            assert httpx.get(f"{base}/healthz").status_code == 200
            sent += 1
        per_process = counted_per_process(folder)
        assert len([n for n in per_process.values() if n]) == 2, per_process
        for _ in range(4):  # each scrape, whichever process answers it, counts both processes' requests
            with httpx.Client(base_url=base) as client:
                assert requests(scrape(client, key), "/healthz", 200) == sent == sum(per_process.values())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert not list(scratch.glob("tunequeue-metrics-*")), "the metrics folder outlived the server"


def wait_until_up(base: str, server: subprocess.Popen, log: Path) -> None:
    """Until /healthz answers 200: one request counted."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{base}/healthz").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.3)
    raise AssertionError(f"tunequeue serve did not start:\n{log.read_text()[-3000:]}")
