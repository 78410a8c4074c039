"""Alembic on real Postgres and SQLite: upgrade from empty, a down/up round trip, and the migrations
producing exactly the schema the ORM models describe."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from shared import migrate
from shared.models import Base

TABLES = {
    "files",
    "idempotency_keys",
    "jobs",
    "job_events",
    "checkpoints",
    "api_keys",
    "device_usage",
    "base_models",
    "workers",
    "webhook_endpoints",
    "webhook_deliveries",
    "ui_sessions",
    "inference_requests",
    "exports",
    "alembic_version",
}


@pytest.fixture(params=["postgres", "sqlite"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'migrate.db'}"
    return request.getfixturevalue("postgres_url")


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_from_empty_matches_models(database_url):
    migrate.upgrade(url=database_url)
    assert tables(database_url) == TABLES
    engine = create_engine(database_url)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    assert diff == [], f"models and migrations disagree: {diff}"


def test_downgrade_upgrade_round_trip(database_url):
    migrate.upgrade(url=database_url)
    migrate.downgrade("base", url=database_url)
    assert tables(database_url) <= {"alembic_version"}
    migrate.upgrade(url=database_url)
    assert tables(database_url) == TABLES


def test_cli_upgrade(database_url, monkeypatch):
    from tunequeue.cli import main

    monkeypatch.setenv("TUNEQUEUE_DATABASE_URL", database_url)
    from shared.settings import get_settings

    get_settings.cache_clear()
    assert main(["db", "upgrade"]) == 0
    assert "jobs" in tables(database_url)
