"""The polled read routes (GET of a job, a page of its events) read with one SELECT on a plain connection, not
through a session: their bodies must stay byte for byte what the session path renders, on Postgres and SQLite,
and another tenant's job must stay a 404 like a made-up id. Pooled connections are checked only after sitting
idle: one that broke meanwhile is replaced before a request uses it."""

import re

import pytest
from fastapi.testclient import TestClient

from shared.ids import new_id
from tests.support import make_key


@pytest.fixture
def client(migrated_database) -> TestClient:
    """The API on a migrated database of each kind, with a key of tenant `mine`."""
    from api.app import create_app

    with TestClient(create_app(), headers={"Authorization": f"Bearer {make_key('mine')}"}) as client:
        yield client


def add_job(tenant: str, events: int = 0, **fields) -> str:
    """A job with every shown field set (floats, nested JSON, non-ASCII text), and `events` events."""
    from shared.db import session_scope
    from shared.jobs.models import Job, JobEvent

    job_id = new_id("ftjob")
    values = dict(
        id=job_id, tenant=tenant, status="failed", model="tiny-llama", training_file="file-a",
        validation_file="file-b", suffix="café", seed=7,
        hyperparameters={"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1e-05, "warmup_ratio": 0.1},
        training_options={"lora_r": 16, "lora_alpha": 32.0, "lora_target_modules": ["q_proj", "v_proj"]},
        user_metadata={"team": "ml", "note": "naïve ✓"}, fine_tuned_model=None, trained_tokens=1234,
        error={"code": "out_of_memory", "message": "CUDA out of memory", "param": None}, result_files=["file-r"],
        attempt=2, priority=3, devices=2, cancel_requested=False, progress={"step": 5, "loss": 0.25},
        validation_report={"examples": 10, "warnings": []}, created_at=1_700_000_000, started_at=1_700_000_005,
        finished_at=1_700_000_600, estimated_finish=None, updated_at=1_700_000_600,
    )  # fmt: skip
    values.update(fields)
    with session_scope() as session:
        session.add(Job(**values))
        session.flush()
        for step in range(events):
            data = {"step": step, "train_loss": 1.0 / (step + 1)} if step % 2 else None
            session.add(
                JobEvent(job_id=job_id, attempt=1, created_at=1_700_000_000 + step, message=f"step {step} ✓", data=data)
            )
    return job_id


def session_rendered_job(job_id: str) -> bytes:
    """What the session path (`get_job`, an ORM load) renders for the job."""
    from shared.db import session_scope
    from shared.jobs.schemas import FineTuningJob
    from shared.jobs.service import get_job

    with session_scope() as session:
        return FineTuningJob.of(get_job(session, "mine", job_id)).model_dump_json().encode()


def session_rendered_events(job_id: str, after: str | None, limit: int) -> bytes:
    from shared.db import session_scope
    from shared.jobs.schemas import JobEventObject
    from shared.jobs.service import get_job, list_events
    from shared.pagination import Page

    with session_scope() as session:
        events = list_events(session, get_job(session, "mine", job_id), after=after, limit=limit + 1)
        return Page[JobEventObject].of(events, limit, JobEventObject.of).model_dump_json().encode()


def test_a_job_reads_byte_for_byte_as_the_session_path_renders_it(client):
    for job_id in (add_job("mine"), add_job("mine", error=None, user_metadata=None, suffix=None, progress=None)):
        response = client.get(f"/v1/fine_tuning/jobs/{job_id}")
        assert response.status_code == 200, response.text
        assert response.content == session_rendered_job(job_id)
        assert response.headers["content-type"] == "application/json"


def test_another_tenants_job_is_a_404_like_a_made_up_id(client):
    theirs = add_job("theirs", events=3)
    made_up = "ftjob-" + "0" * 24
    for path in ("", "/events"):
        refused = client.get(f"/v1/fine_tuning/jobs/{theirs}{path}")
        unknown = client.get(f"/v1/fine_tuning/jobs/{made_up}{path}")
        assert refused.status_code == unknown.status_code == 404
        expected = unknown.json()["error"]
        expected["message"] = expected["message"].replace(made_up, theirs)
        assert refused.json() == {"error": expected}
        assert theirs in refused.json()["error"]["message"]


def test_event_pages_read_byte_for_byte_as_the_session_path_renders_them(client):
    job_id = add_job("mine", events=7)
    after, seen = None, []
    while True:
        query = f"?limit=3&after={after}" if after else "?limit=3"
        response = client.get(f"/v1/fine_tuning/jobs/{job_id}/events{query}")
        assert response.status_code == 200, response.text
        assert response.content == session_rendered_events(job_id, after, 3)
        page = response.json()
        seen += [event["message"] for event in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert seen == [f"step {step} ✓" for step in reversed(range(7))]


def test_an_event_cursor_of_another_job_is_a_404(client):
    job_id, other = add_job("mine", events=2), add_job("mine", events=2)
    cursor = client.get(f"/v1/fine_tuning/jobs/{other}/events").json()["data"][0]["id"]
    response = client.get(f"/v1/fine_tuning/jobs/{job_id}/events?after={cursor}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "event_not_found" and response.json()["error"]["param"] == "after"


def test_the_polled_reads_execute_their_statements_as_compiled(client):
    """Each poll executes the statement object SQLAlchemy compiled and cached, not a fresh one built per request:
    a fresh one has its result columns matched to the cached statement's on every execution, which cost more CPU
    than the rest of the request (docs/BENCHMARKS.md, API under load)."""
    from sqlalchemy import event

    from shared.db import get_engine

    job_id = add_job("mine", events=5)
    seen = []

    def note(connection, cursor, statement, parameters, context, executemany):
        table = re.search(r"\bFROM (\w+)", statement)
        if context.compiled is not None and table:
            seen.append((table.group(1), context.compiled.statement is context.invoked_statement))

    event.listen(get_engine(), "before_cursor_execute", note)
    try:
        for _ in range(2):
            assert client.get(f"/v1/fine_tuning/jobs/{job_id}").status_code == 200
            first = client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=2")
            assert first.status_code == 200
            after = first.json()["data"][-1]["id"]
            assert client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=2&after={after}").status_code == 200
    finally:
        event.remove(get_engine(), "before_cursor_execute", note)
    reads = [reused for table, reused in seen if table in ("jobs", "job_events")]
    assert len(reads) >= 2 * 6  # the job; the job then a page; the job, the cursor's position, then a page
    assert all(reads), seen


def test_a_pooled_connection_broken_while_idle_is_replaced_before_use(postgres_url, monkeypatch):
    import psycopg
    from sqlalchemy import text

    from shared import db

    monkeypatch.setattr(db, "IDLE_PING_SECONDS", 0.0)  # every checkout after a checkin is checked
    engine = db.make_engine(postgres_url)
    try:
        with engine.connect() as connection:
            backend = connection.execute(text("SELECT pg_backend_pid()")).scalar()
        with psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [backend])
        with engine.connect() as connection:
            assert connection.execute(text("SELECT pg_backend_pid()")).scalar() != backend
    finally:
        engine.dispose()
