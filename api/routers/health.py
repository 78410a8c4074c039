"""Liveness and readiness. Probes carry no key, so readiness tells them only up or down per dependency; the
reasons (which name hosts, ports and the bucket) go to the log, and to callers with an admin key."""

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from shared import migrate
from shared.auth.service import authenticate
from shared.db import get_engine, session_scope
from shared.errors import TunequeueError
from shared.queue import get_celery
from shared.storage import get_storage

router = APIRouter(tags=["health"])
log = logging.getLogger("tunequeue.api")


@router.get("/healthz")
def healthz():
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request):
    """`checks` says "ok" or "down" for each dependency; with an admin key (optional), "error: ..." says why.
    The key is read from the request rather than declared: the probe needs none, and the spec says so."""
    authorization = request.headers.get("authorization")
    problems = {
        "database": _problem(_database),
        "broker": _problem(_broker),
        "storage": _problem(lambda: get_storage().ping()),
    }
    for name, problem in problems.items():
        if problem is not None:
            log.warning("not ready: %s: %s", name, problem)
    details = problems["database"] is None and _is_admin(authorization)
    checks = {
        name: "ok" if problem is None else (f"error: {problem}"[:300] if details else "down")
        for name, problem in problems.items()
    }
    ready = all(problem is None for problem in problems.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
    )


def _problem(probe) -> str | None:
    try:
        probe()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _is_admin(authorization: str | None) -> bool:
    """Whether the request carries an admin key. A missing, wrong or tenant key is no error here: the probe
    answers all of them, with the short form."""
    scheme, _, secret = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        return False
    try:
        with session_scope() as session:
            caller = authenticate(session, secret.strip())
    except TunequeueError:  # e.g. an expired key
        return False
    return caller is not None and caller.admin


def _database() -> None:
    with get_engine().connect() as connection:
        migrate.require_current(connection)


def _broker() -> None:
    with get_celery().connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=3)
