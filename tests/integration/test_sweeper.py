"""The sweeper on the embedded defaults (SQLite + kombu's SQLAlchemy broker, which never redelivers a message a
dead worker took): a job whose message is gone is published again, a job whose lease expired is requeued or,
past max_attempts, failed with worker_lost — and a worker started afterwards finishes the requeued job."""

import pytest
from sqlalchemy import text

from shared import db, queue, settings, storage
from shared.jobs import state
from shared.jobs.recovery import sweep
from shared.queue import TRAIN_TASK, VALIDATE_TASK, waiting_messages
from tests.faults import wait_for
from tests.support import chat, write_jsonl


def use_env(monkeypatch, env: dict) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for cached in (settings.get_settings, db.get_engine, db.get_sessionmaker, storage.get_storage, queue.get_celery):
        cached.cache_clear()


def drop_broker_messages() -> None:
    """The embedded broker is its own SQLite file."""
    from sqlalchemy import create_engine

    engine = create_engine(settings.get_settings().resolved_broker_url.removeprefix("sqla+"))
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM kombu_message"))
    engine.dispose()


def sql(statement: str, **params):
    with db.session_scope() as session:
        return session.execute(text(statement), params)


def test_lost_messages_and_expired_leases_on_embedded_defaults(
    embedded_env, make_stack, tiny_model, tmp_path, monkeypatch
):
    env = {**embedded_env, "TUNEQUEUE_REPUBLISH_AFTER_SECONDS": "30", "TUNEQUEUE_MAX_ATTEMPTS": "2"}
    stack = make_stack(env, tiny_model, worker=False)
    use_env(monkeypatch, env)
    data = write_jsonl(tmp_path / "t.jsonl", [chat(f"q{i}", f"Squawk {i}") for i in range(16)])
    file_id = stack.upload(data)["id"]
    body = {"model": "tiny-llama", "training_file": file_id, "hyperparameters": {"n_epochs": 1, "batch_size": 8}}
    job_id = stack.create_job(**body)["id"]
    wait_for(lambda: (VALIDATE_TASK, job_id) in waiting_messages(), 10, "the validate message")

    drop_broker_messages()  # the broker lost it (a worker took it and died)
    assert (VALIDATE_TASK, job_id) not in waiting_messages()
    assert sweep().republished == []  # too recent: a publish may still be on its way
    sql("UPDATE jobs SET updated_at = updated_at - 60 WHERE id = :id", id=job_id)
    assert sweep().republished == [job_id]
    assert (VALIDATE_TASK, job_id) in waiting_messages()
    sql("UPDATE jobs SET updated_at = updated_at - 60 WHERE id = :id", id=job_id)
    assert sweep().republished == []  # its message is waiting now: nothing to do

    # A worker claimed it (attempt 1) and vanished: the lease runs out.
    drop_broker_messages()
    sql(
        "UPDATE jobs SET status = 'running', attempt = 1, worker = 'gone:1', lease_expires_at = 1 WHERE id = :id",
        id=job_id,
    )
    assert sweep().requeued == [job_id]
    events = stack.client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
    assert "stopped renewing its lease (worker lost)" in events[0]["message"]
    assert "gone:1" not in events[0]["message"]  # the worker's host and pid are the admins' to see, in logs
    assert "requeued: attempt 2 of 2" in events[0]["message"]
    assert (TRAIN_TASK, job_id) in waiting_messages()

    # A second job whose last allowed attempt is lost fails with worker_lost instead.
    other = stack.create_job(**body)["id"]
    sql(
        "UPDATE jobs SET status = 'running', attempt = 2, worker = 'gone:2', lease_expires_at = 1 WHERE id = :id",
        id=other,
    )
    assert sweep().failed == [other]
    error = stack.client.get(f"/v1/fine_tuning/jobs/{other}").json()["error"]
    assert error["code"] == "worker_lost" and "giving up after 2 attempt(s)" in error["message"]

    stack.start_worker()
    job = stack.wait(job_id, timeout=300)
    assert job["status"] == state.SUCCEEDED, (job["error"], stack.logs())


def test_postgres_ends_the_transaction_of_a_frozen_worker(postgres_url, monkeypatch):
    """A worker frozen (SIGSTOP) inside a transaction holds its job row's lock: the other workers' sweepers
    could not requeue the job until it woke. Worker connections ask Postgres to end such a transaction."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    use_env(monkeypatch, {"TUNEQUEUE_DATABASE_URL": postgres_url, "TUNEQUEUE_WORKER_IDLE_TRANSACTION_SECONDS": "1"})
    other = db.make_engine(postgres_url)
    with other.begin() as connection:
        connection.execute(text("CREATE TABLE lock_probe (id int PRIMARY KEY, attempt int)"))
        connection.execute(text("INSERT INTO lock_probe VALUES (1, 1)"))

    def frozen_holder(engine):
        held = engine.connect()
        held.begin()
        held.execute(text("SELECT * FROM lock_probe WHERE id = 1 FOR UPDATE"))
        return held  # and then no statement: frozen

    def requeue(lock_timeout: str) -> None:
        with other.begin() as connection:
            connection.execute(text(f"SET LOCAL lock_timeout = '{lock_timeout}'"))
            connection.execute(text("UPDATE lock_probe SET attempt = attempt + 1 WHERE id = 1"))

    api_like = frozen_holder(db.make_engine(postgres_url))  # no idle limit: the row stays locked
    with pytest.raises(OperationalError, match="lock timeout"):
        requeue("2s")
    api_like.close()

    db.for_workers()
    worker = frozen_holder(db.get_engine())
    requeue("10s")  # waits until Postgres ends the worker's idle transaction, about 1 s
    with pytest.raises(DBAPIError, match="idle-in-transaction timeout") as ended:
        worker.execute(text("SELECT 1"))  # the frozen worker, once awake, finds its transaction gone
    assert db._connection_lost(ended.value)  # `retrying` runs its write again on a fresh connection
    with other.connect() as connection:
        assert connection.scalar(text("SELECT attempt FROM lock_probe")) == 2
