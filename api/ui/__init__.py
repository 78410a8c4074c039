"""The dashboard (/ui): pages, their sign-in, and their static files (our own CSS and scripts, and uPlot,
vendored with its licence: no CDN, no build step, nothing fetched from another origin)."""

import inspect
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from api.ui.pages import HERE, SignInRequired, error_page, router
from shared.errors import TunequeueError

# Every page and static file: scripts and styles from this origin only, no framing, no referrer to elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.add_api_route("/", _to_dashboard, include_in_schema=False)  # a browser pointed at the server
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")
    previous = app.exception_handlers[TunequeueError]

    @app.exception_handler(SignInRequired)
    async def _sign_in(_: Request, exc: SignInRequired) -> Response:
        return RedirectResponse("/ui/sign-in?next=" + _quoted(exc.next_url), status_code=303)

    @app.exception_handler(TunequeueError)
    async def _page_or_json(request: Request, exc: TunequeueError) -> Response:
        if request.url.path.startswith("/ui/") and not request.url.path.startswith("/ui/static/"):
            return await run_in_threadpool(error_page, request, exc)  # reads the session, to show the menu
        answer = previous(request, exc)
        return await answer if inspect.isawaitable(answer) else answer

    app.add_middleware(PageHeaders)


class PageHeaders:
    """Pure ASGI (no buffering, nothing done for other paths): the security headers on everything under /ui,
    and no caching of pages, which show live state."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith("/ui"):
            return await self.app(scope, receive, send)
        extra = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
        if not path.startswith("/ui/static/"):
            extra.append((b"cache-control", b"no-store"))

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, with_headers)


async def _to_dashboard() -> RedirectResponse:
    return RedirectResponse("/ui/jobs", status_code=307)


def _quoted(url: str) -> str:
    return quote(url, safe="/")
