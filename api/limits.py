"""Request body limits, enforced while the body streams in: a declared Content-Length over the limit is
refused before a byte is read, and a body without one (chunked) is cut off as soon as it passes the limit.
Uploads (`POST /v1/files`) may be as large as TUNEQUEUE_MAX_UPLOAD_BYTES; every other body is small JSON."""

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.settings import get_settings

MULTIPART_OVERHEAD = 64 * 1024  # form fields and part headers around the uploaded file


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"Request body is over the {limit:,}-byte limit for this route")


class BodyLimit:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = get_settings()
        upload = scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/files"
        limit = settings.max_upload_bytes + MULTIPART_OVERHEAD if upload else settings.max_request_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await refuse(send, limit)
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the route's body parsing: FastAPI passes HTTPExceptions through, and the
                    # error handler renders it as a 413 in OpenAI's shape.
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)


async def refuse(send: Send, limit: int) -> None:
    import json

    body = json.dumps(
        {
            "error": {
                "message": f"Request body is over the {limit:,}-byte limit for this route",
                "type": "invalid_request_error",
                "param": None,
                "code": "payload_too_large",
            }
        }
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    # The client may still be sending: tell it the connection closes rather than read what it sends.
    headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
