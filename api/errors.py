"""One place renders every error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

import json
import logging
import secrets
from collections.abc import Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from sqlalchemy.exc import DataError, OperationalError
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import TunequeueError
from shared.storage import StorageError

log = logging.getLogger("tunequeue.api")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorDetail


def declare(*statuses: int) -> dict:
    """OpenAPI `responses` for these error statuses (all rendered by this module, all ErrorResponse)."""
    descriptions = {
        400: "Invalid request: the message names the field or line",
        401: "Missing, incorrect or revoked API key",
        403: "The key lacks the role this route needs",
        404: "No such object for this key's tenant",
        409: "Conflict with the object's state, or an Idempotency-Key reused with another body",
        413: "Request body or file over its limit",
        422: "Understood but unusable (e.g. a file whose purpose is not fine-tune)",
        429: "A per-tenant limit was reached; see Retry-After",
        500: "An unexpected error; the message carries the request id to quote when reporting it",
        503: "The database or object storage is unavailable; see Retry-After",
        504: "The request ran past its time limit",
    }
    return {status: {"model": ErrorResponse, "description": descriptions[status]} for status in statuses}


def api_routes(routes) -> Iterator[APIRoute]:
    """Every route of the app, through FastAPI's nested included routers."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):
            yield from api_routes(route.original_router.routes)


def allowed_methods(request: Request) -> set[str]:
    methods: set[str] = set()
    for route in api_routes(request.app.routes):
        match, _ = route.matches({**request.scope, "method": "__none__"})
        if match != Match.NONE:
            methods |= route.methods or set()
    return methods


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
    async def _http(request: Request, exc: HTTPException):
        code = {404: "not_found", 413: "payload_too_large", 405: "method_not_allowed"}.get(exc.status_code)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # every method the path has, not only those of the first route matched
            headers["Allow"] = ", ".join(sorted(allowed_methods(request)))
        return JSONResponse(
            error_body(str(exc.detail), "invalid_request_error", None, code),
            status_code=exc.status_code,
            headers=headers or None,
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


REQUEST_ID_HEADER = "x-request-id"


class RequestIds:
    """Gives every request an id, sent back in the x-request-id header. An error no handler knows becomes a
    500 in OpenAI's shape whose message quotes that id, and the traceback goes to the log under the same id:
    the SDK shows the user a message they can report, and the operator finds the one log line it points to.
    Added outermost, so that every response (refusals of the other middlewares included) carries the header."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = "req_" + secrets.token_hex(12)
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER.encode()]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER.encode(), rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("internal error, request id %s: %s %s", rid, scope["method"], scope["path"])
            if started:  # a streamed body broke off after its status was sent: the server cuts the connection
                raise
            await send_server_error(send_with_id, rid)


async def send_server_error(send: Send, rid: str) -> None:
    body = json.dumps(
        error_body(f"Internal error; quote request id {rid} when reporting it", "server_error", None, "server_error")
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 500, "headers": headers})
    await send({"type": "http.response.body", "body": body})
