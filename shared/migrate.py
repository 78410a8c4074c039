"""Alembic driven from code, so `tunequeue db upgrade` works from an installed package with no alembic.ini."""

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine
from sqlalchemy.engine import make_url

import migrations
from shared.settings import get_settings

# Alembic reports each step at INFO; the CLI says what changed in one line instead.
logging.getLogger("alembic").setLevel(logging.WARNING)


@dataclass(frozen=True)
class SchemaState:
    current: str | None  # None: no tunequeue schema at all
    head: str

    @property
    def is_current(self) -> bool:
        return self.current == self.head

    @property
    def problem(self) -> str | None:
        """What is wrong with the schema, and what to run; None when it is current."""
        if self.current is None:
            return "has no tunequeue tables yet: run `tunequeue db upgrade`"
        if not self.is_current:
            return f"is at schema {self.current}, this version needs {self.head}: run `tunequeue db upgrade`"
        return None


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", (url or get_settings().resolved_database_url).replace("%", "%%"))
    return config


def upgrade(revision: str = "head", url: str | None = None) -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(revision: str, url: str | None = None) -> None:
    command.downgrade(alembic_config(url), revision)


def schema_state(url: str | None = None) -> SchemaState:
    """Where the database stands against the newest migration; raises SQLAlchemy's OperationalError when the
    database cannot be reached."""
    url = url or get_settings().resolved_database_url
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return state_of(connection)
    finally:
        engine.dispose()


def state_of(connection: Connection) -> SchemaState:
    return SchemaState(current=MigrationContext.configure(connection).get_current_revision(), head=head_revision())


@lru_cache
def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head() or ""


def require_current(connection: Connection) -> None:
    """For readiness probes: a server on an old schema is not ready, whatever else answers."""
    problem = state_of(connection).problem
    if problem:
        raise RuntimeError(f"the database {problem}")


def describe_database(url: str | None = None) -> str:
    """The database URL with its password hidden, for messages."""
    return make_url(url or get_settings().resolved_database_url).render_as_string(hide_password=True)
