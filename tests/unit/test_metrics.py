"""Metrics: each request is counted under the template of the route that answered (never its raw path, which
carries ids), and the figures read from the database at scrape time come from a few aggregate queries however
many rows there are, on Postgres and SQLite."""

import re
import time

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi.testclient import TestClient
from sqlalchemy import event

from shared.ids import now
from tests.scraped import Scrape


def counted() -> dict[tuple[str, str, str], float]:
    """This process's request counts by (method, route, status)."""
    from api.metrics import REQUESTS

    return {
        (sample.labels["method"], sample.labels["route"], sample.labels["status"]): sample.value
        for family in REQUESTS.collect()
        for sample in family.samples
        if sample.name == "tunequeue_http_requests_total"
    }


def counted_since(before: dict) -> dict[tuple[str, str, str], float]:
    return {key: n - before.get(key, 0) for key, n in counted().items() if n != before.get(key, 0)}


def test_every_operation_is_counted_under_its_own_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEQUEUE_DATA_DIR", str(tmp_path))  # embedded, not migrated: /readyz answers 503
    for key in ("TUNEQUEUE_DATABASE_URL", "TUNEQUEUE_BROKER_URL", "TUNEQUEUE_STORAGE_URL"):
        monkeypatch.delenv(key, raising=False)
    from api.app import create_app

    app = create_app()
    client = TestClient(app)
    paths = app.openapi()["paths"]
    before = counted()
    for path, operations in paths.items():
        if path == "/readyz":  # probes the broker and storage: its path is checked with the others below
            continue
        for method in operations:
            client.request(method.upper(), re.sub(r"\{[^}]+\}", "ftjob-0123", path))
    labels = {route for _, route, _ in counted_since(before)}
    assert labels == set(paths) - {"/readyz"}
    assert not any("ftjob-0123" in label for label in labels)

    before = counted()
    client.get("/readyz")
    client.get("/docs")
    client.get("/docs-assets/swagger-ui.css")
    client.get("/docs-assets/nothing-here.js")
    client.get("/v1/fine_tuning/jobs/ftjob-0123/no-such-thing")
    client.get("/v1/files/", follow_redirects=False)  # the router's slash redirect: no route answered
    client.request("BREW", "/healthz")
    assert counted_since(before) == {
        ("GET", "/readyz", "503"): 1,
        ("GET", "/docs", "200"): 1,
        ("GET", "/docs-assets/{path}", "200"): 1,
        ("GET", "/docs-assets/{path}", "404"): 1,
        ("GET", "unmatched", "404"): 1,
        ("GET", "unmatched", "307"): 1,
        ("other", "/healthz", "405"): 1,  # a made-up method is no label of its own
    }


def test_openapi_declares_metrics_as_text_for_admin_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEQUEUE_DATA_DIR", str(tmp_path))
    from api.app import create_app

    operation = create_app().openapi()["paths"]["/metrics"]["get"]
    assert operation["security"] == [{"bearerAuth": []}]
    assert set(operation["responses"]["200"]["content"]) == {"text/plain"}
    assert {"401", "403"} <= set(operation["responses"])


def test_an_error_is_counted_as_the_500_the_client_gets(tmp_path):
    from api.errors import RequestIds
    from api.metrics import RequestMetrics

    app = FastAPI()
    (tmp_path / "style.css").write_text("body {}")
    app.mount("/static", StaticFiles(directory=tmp_path))

    @app.get("/boom/{n}")
    def boom(n: int):
        raise RuntimeError("boom")

    app.add_middleware(RequestMetrics)
    app.add_middleware(RequestIds)
    behind_proxy = TestClient(app, root_path="/api")  # served under /api by a proxy: the labels do not carry it
    before = counted()
    assert behind_proxy.get("/boom/1").status_code == 500
    assert TestClient(app).get("/boom/2").status_code == 500
    assert TestClient(app).get("/static/style.css").status_code == 200
    assert counted_since(before) == {("GET", "/boom/{n}", "500"): 2, ("GET", "/static/{path}", "200"): 1}


BEGIN = 1_800_000_000


def job(status: str, created: int, started: int | None, finished: int | None, tokens: int | None = None) -> dict:
    from shared.ids import new_id

    return dict(
        id=new_id("ftjob"), tenant="t", status=status, model="m", training_file="file-x", seed=1, hyperparameters={},
        training_options={}, result_files=[], cancel_requested=False, trained_tokens=tokens, attempt=1,
        created_at=BEGIN + created, started_at=None if started is None else BEGIN + started,
        finished_at=None if finished is None else BEGIN + finished, updated_at=BEGIN,
    )  # fmt: skip


def add_rows(jobs: list[dict], workers: list[tuple[str, int, dict]], deliveries: list[tuple[str, int]]) -> None:
    from sqlalchemy import insert

    from shared.db import session_scope
    from shared.ids import new_id
    from shared.jobs.models import Job
    from shared.webhooks.models import WebhookDelivery, WebhookEndpoint
    from shared.workers.models import WorkerHeartbeat

    with session_scope() as session:
        session.execute(insert(Job), jobs)
        for name, heard, info in workers:
            session.add(WorkerHeartbeat(hostname=name, pid=1, started_at=heard, last_heartbeat=heard, info=info))
        endpoint = new_id("wh")
        session.add(WebhookEndpoint(id=endpoint, tenant="t", url="http://127.0.0.1:9/h", secret="-", created_at=now()))
        session.flush()
        for status, attempts in deliveries:
            session.add(
                WebhookDelivery(
                    id=new_id("msg"), endpoint_id=endpoint, job_id="ftjob-x", type="fine_tuning.job.succeeded",
                    payload="{}", status=status, attempts=attempts, created_at=now(), next_attempt_at=now(), history=[],
                )
            )  # fmt: skip


def scrape_counting_queries() -> tuple[Scrape, list[str]]:
    from api.metrics import exposition
    from shared.db import get_engine, session_scope

    statements: list[str] = []

    def record(conn, cursor, statement, *args):
        statements.append(statement)

    event.listen(get_engine(), "before_cursor_execute", record)
    try:
        with session_scope() as session:
            body = exposition(session).decode()
    finally:
        event.remove(get_engine(), "before_cursor_execute", record)
    return Scrape(body), statements


def test_database_figures_in_a_few_queries(migrated_database):
    gpu = {"slots": {"kind": "gpu", "total": 4, "free": 1, "devices": [0, 1, 2, 3]}}
    add_rows(
        [
            job("succeeded", created=0, started=10, finished=100, tokens=500),  # waited 10 s, ran 90 s
            job("succeeded", created=0, started=20, finished=4020, tokens=700),  # waited 20 s, ran 4000 s
            job("failed", created=0, started=5, finished=30),  # waited 5 s, ran 25 s
            job("failed", created=0, started=None, finished=1),  # failed in validation: never started
            job("cancelled", created=0, started=None, finished=2),
            job("running", created=0, started=3, finished=None),
            job("queued", created=0, started=None, finished=None),
        ],
        workers=[("1@gpu-node", now(), gpu), ("2@cpu-node", now(), {}), ("3@gone", now() - 86400, gpu)],
        deliveries=[("delivered", 3), ("failed", 8), ("pending", 1)],
    )
    scrape, statements = scrape_counting_queries()
    assert len(statements) == 4, statements  # jobs by status, finished jobs, workers, webhook deliveries

    assert {status: scrape.value("tunequeue_jobs", status=status) for status in ("succeeded", "failed", "running")} == {
        "succeeded": 2,
        "failed": 2,
        "running": 1,
    }
    assert scrape.value("tunequeue_jobs", status="paused") == 0  # every status has a series
    assert scrape.check_histograms() >= 4
    duration = "tunequeue_job_duration_seconds"
    assert scrape.value(f"{duration}_count", status="succeeded") == 2
    assert scrape.value(f"{duration}_sum", status="succeeded") == 4090
    assert [scrape.value(f"{duration}_bucket", status="succeeded", le=le) for le in ("60.0", "120.0", "3600.0")] == [
        0,
        1,
        1,
    ]
    assert scrape.value(f"{duration}_bucket", status="succeeded", le="7200.0") == 2
    assert scrape.value(f"{duration}_bucket", status="failed", le="30.0") == 1
    assert scrape.value(f"{duration}_count", status="failed") == 1  # the one that never started is in no bucket
    assert scrape.value(f"{duration}_count", status="cancelled") == 0
    wait = "tunequeue_job_queue_wait_seconds"
    assert [scrape.value(f"{wait}_bucket", le=le) for le in ("1.0", "5.0", "15.0", "30.0", "+Inf")] == [0, 1, 2, 3, 3]
    assert scrape.value(f"{wait}_sum") == 35
    assert scrape.value("tunequeue_trained_tokens_total") == 1200

    assert scrape.value("tunequeue_workers") == 2  # the one silent for a day is gone
    assert scrape.value("tunequeue_worker_slots", worker="1@gpu-node", kind="gpu") == 4
    assert scrape.value("tunequeue_worker_slots_free", worker="1@gpu-node", kind="gpu") == 1
    assert scrape.label_values("tunequeue_worker_slots", "worker") == {"1@gpu-node", "2@cpu-node"}

    assert {s: scrape.value("tunequeue_webhook_deliveries", status=s) for s in ("pending", "delivered", "failed")} == {
        "pending": 1,
        "delivered": 1,
        "failed": 1,
    }
    assert scrape.value("tunequeue_webhook_failed_attempts") == 3 - 1 + 8 + 1
    assert scrape.value("tunequeue_broker_up") == 1 and scrape.value("tunequeue_queue_messages") == 0

    # More jobs, workers and deliveries: the same queries, no more.
    add_rows(
        [job("succeeded", created=0, started=1, finished=2, tokens=1) for _ in range(50)],
        workers=[(f"{n}@more", now(), gpu) for n in range(10, 30)],
        deliveries=[("failed", 2)] * 30,
    )
    scrape, more_statements = scrape_counting_queries()
    assert more_statements == statements
    assert scrape.value("tunequeue_trained_tokens_total") == 1250
    assert scrape.value("tunequeue_workers") == 22


def test_an_absent_broker_leaves_the_other_figures(migrated_database, monkeypatch):
    monkeypatch.setenv("TUNEQUEUE_BROKER_URL", "redis://127.0.0.1:1/0")  # nothing listens there
    started = time.monotonic()
    scrape, _ = scrape_counting_queries()
    assert time.monotonic() - started < 5
    assert scrape.value("tunequeue_broker_up") == 0
    assert ("tunequeue_queue_messages", frozenset()) not in scrape.samples
    assert scrape.value("tunequeue_jobs", status="queued") == 0 and "tunequeue_workers" in scrape.families
