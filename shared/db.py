"""Engine and session scope. The entry point (a FastAPI dependency, a task, a CLI command) owns the
transaction; services only `flush()`. Work that must happen only once the transaction is durable (publishing
a task) is registered with `after_commit` and dropped on rollback."""

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_exponential

from shared.settings import get_settings

_AFTER_COMMIT = "tunequeue_after_commit"
T = TypeVar("T")
log = logging.getLogger("tunequeue.db")


class Base(DeclarativeBase):
    pass


# Set in worker processes (`for_workers`): Postgres ends their transactions left idle this long.
_IDLE_TRANSACTION_SECONDS: list[float] = []


def make_engine(url: str, idle_transaction_seconds: float = 0) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    connect_args = {}
    if idle_transaction_seconds > 0:
        timeout_ms = int(idle_transaction_seconds * 1000)
        connect_args["options"] = f"-c idle_in_transaction_session_timeout={timeout_ms}"
    # A connection past pool_size is opened for one checkout and closed at checkin: a connect per request while
    # more than pool_size requests run at once, which a polled API process reaches first. At most 20 per
    # process: four API processes stay within Postgres' default max_connections (100) beside the workers.
    engine = create_engine(url, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW, connect_args=connect_args)
    ping_when_idle(engine, IDLE_PING_SECONDS)
    return engine


POOL_SIZE, MAX_OVERFLOW = 10, 10
IDLE_PING_SECONDS = 1.0
_CHECKED_IN_AT = "tunequeue_checked_in_at"


def ping_when_idle(engine: Engine, idle_seconds: float) -> None:
    """Check a pooled connection before use only when it sat unused for `idle_seconds`: one that a database
    restart or an idle timeout broke is replaced before the request uses it, as pool_pre_ping would, without a
    round trip on every checkout of a busy pool. A connection that breaks while in use fails its request (the
    API answers 503) and SQLAlchemy then discards every connection of the pool opened before the failure."""

    def checkin(_dbapi_connection, record: ConnectionPoolEntry) -> None:
        record.info[_CHECKED_IN_AT] = time.monotonic()

    def checkout(dbapi_connection, record: ConnectionPoolEntry, _proxy) -> None:
        checked_in = record.info.pop(_CHECKED_IN_AT, None)
        if checked_in is None or time.monotonic() - checked_in < idle_seconds:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise DisconnectionError("pooled connection is gone") from exc  # the pool opens another one
        if not alive:
            raise DisconnectionError("pooled connection is gone")

    event.listen(engine, "checkin", checkin)
    event.listen(engine, "checkout", checkout)


def for_workers() -> None:
    """A worker's transactions are short. If the worker freezes inside one (SIGSTOP, a paused VM), the row
    locks it holds would block the sweeper of every other worker from taking its jobs over, for as long as
    it stays frozen. Postgres ends such a transaction after `worker_idle_transaction_seconds`. The API does
    not get this, because an upload streams to storage inside its request's transaction."""
    _IDLE_TRANSACTION_SECONDS[:] = [get_settings().worker_idle_transaction_seconds]
    get_sessionmaker.cache_clear()
    get_engine.cache_clear()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # The API and the worker write the same file at once: WAL lets readers proceed, the busy timeout
    # makes a writer wait instead of failing with "database is locked".
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().resolved_database_url, *_IDLE_TRANSACTION_SECONDS)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    factory = sessionmaker(bind=get_engine(), expire_on_commit=False)
    event.listen(factory, "after_commit", _run_after_commit)
    event.listen(factory, "after_soft_rollback", _drop_after_commit)
    return factory


def after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run `callback` once this session's transaction has committed; never if it rolls back."""
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


def _run_after_commit(session: Session) -> None:
    # The data is durable by now: a failing callback (the broker is down) is logged, not raised, so the
    # caller still gets its answer. The job stays in its state, to be published again.
    for callback in session.info.pop(_AFTER_COMMIT, []):
        try:
            callback()
        except Exception:
            log.exception("after-commit callback failed")


def _drop_after_commit(session: Session, _previous_transaction) -> None:
    session.info.pop(_AFTER_COMMIT, None)


@contextmanager
def session_scope() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


IDLE_TRANSACTION_ENDED = "25P03"  # Postgres ended a transaction left idle too long (`for_workers`)


def _connection_lost(exc: BaseException) -> bool:
    if not isinstance(exc, DBAPIError):
        return False
    return isinstance(exc, (OperationalError, InterfaceError)) or getattr(exc.orig, "sqlstate", None) == (
        IDLE_TRANSACTION_ENDED
    )


def retrying(action: Callable[[Session], T], what: str, deadline_seconds: float = 300) -> T:
    """Run `action` in its own transaction, and run it again while the database is unreachable (a restart, a
    failover) for up to `deadline_seconds`. For a worker's writes: training goes on meanwhile, and the writes
    are fenced, so running one twice is harmless."""

    def log_retry(retry_state: RetryCallState) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        delay = retry_state.next_action.sleep if retry_state.next_action else 0.0
        log.warning("%s: database unavailable (%s); retrying in %.1f s", what, type(exc).__name__, delay)

    def in_transaction() -> T:
        with session_scope() as session:
            return action(session)

    return Retrying(
        retry=retry_if_exception(_connection_lost),
        wait=wait_exponential(multiplier=0.5, max=5.0),
        stop=stop_after_delay(deadline_seconds),
        before_sleep=log_retry,
        reraise=True,
    )(in_transaction)
