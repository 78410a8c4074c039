from fastapi import APIRouter
from fastapi.responses import JSONResponse

from shared import migrate
from shared.db import get_engine
from shared.queue import get_celery
from shared.storage import get_storage

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz():
    return {"status": "ok"}


@router.get("/readyz")
def readyz():
    checks = {"database": _check(_database), "broker": _check(_broker), "storage": _check(lambda: get_storage().ping())}
    ready = all(result == "ok" for result in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
    )


def _check(probe) -> str:
    try:
        probe()
        return "ok"
    except Exception as exc:
        return f"error: {type(exc).__name__}: {exc}"[:300]


def _database() -> None:
    with get_engine().connect() as connection:
        migrate.require_current(connection)


def _broker() -> None:
    with get_celery().connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=3)
