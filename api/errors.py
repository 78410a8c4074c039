"""One place renders every error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, OperationalError
from starlette.exceptions import HTTPException

from shared.errors import TunequeueError
from shared.storage import StorageError

log = logging.getLogger("tunequeue.api")


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def install(app: FastAPI) -> None:
    @app.exception_handler(TunequeueError)
    async def _domain(_: Request, exc: TunequeueError):
        return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=exc.headers or None)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        messages, params = [], []
        for error in exc.errors():
            location = [str(part) for part in error["loc"] if part not in ("body", "query", "path")]
            param = ".".join(location) or "body"
            params.append(param)
            if error["type"] == "extra_forbidden":
                messages.append(f"Unknown field '{param}'")
            elif error["type"] == "missing":
                messages.append(f"Missing required field '{param}'")
            else:
                messages.append(f"Invalid value for '{param}': {error['msg']}")
        body = error_body("; ".join(dict.fromkeys(messages)), "invalid_request_error", params[0] if params else None)
        return JSONResponse(body, status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException):
        code = {404: "not_found", 413: "payload_too_large", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(
            error_body(str(exc.detail), "invalid_request_error", None, code), status_code=exc.status_code
        )

    @app.exception_handler(OperationalError)
    async def _database_down(_: Request, exc: OperationalError):
        log.warning("database unavailable: %s", exc)
        body = error_body("The database is unavailable; retry shortly", "server_error", None, "service_unavailable")
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(StorageError)
    async def _storage_down(_: Request, exc: StorageError):
        log.warning("object storage unavailable: %s", exc)
        body = error_body(
            "Object storage is unavailable; nothing was saved, retry shortly",
            "server_error",
            None,
            "service_unavailable",
        )
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(DataError)
    async def _unstorable(_: Request, exc: DataError):
        # e.g. a NUL character, which Postgres text cannot hold: the request's fault, and nothing was written
        log.info("refused a value the database cannot store: %s", exc.orig)
        message = f"A value in the request cannot be stored: {str(exc.orig).splitlines()[0]}"
        return JSONResponse(error_body(message, "invalid_request_error", None, "invalid_value"), status_code=400)
