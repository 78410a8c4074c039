"""The API's own documentation: Swagger UI and ReDoc served from files installed with the package (no CDN, so
they work on a host with no internet), and an OpenAPI document that declares the bearer key scheme, so that
Swagger's "Authorize" button and generated clients send the key."""

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"
BEARER = {
    "type": "http",
    "scheme": "bearer",
    "description": "An API key: `Authorization: Bearer <key>` (`tunequeue keys create --tenant NAME`).",
}


def install(app: FastAPI) -> None:
    """Call on an app created with `docs_url=None, redoc_url=None`."""
    app.mount(ASSETS, StaticFiles(directory=str(files("fastapi_offline") / "static")), name="docs-assets")

    # Plain Starlette routes, as FastAPI's own documentation pages are: pages, not operations of the API.
    def swagger(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} API",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon.png",
        )

    def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} API",
            redoc_js_url=f"{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS}/favicon.png",
            with_google_fonts=False,
        )

    app.add_route("/docs", swagger, include_in_schema=False)
    app.add_route("/redoc", redoc, include_in_schema=False)

    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            declare_bearer(generate())
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def declare_bearer(schema: dict) -> None:
    """Every operation that reads the `Authorization` header is marked as needing the bearer key."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearerAuth"] = BEARER
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            parameters = operation.get("parameters", [])
            if any(p.get("in") == "header" and p.get("name", "").lower() == "authorization" for p in parameters):
                operation["security"] = [{"bearerAuth": []}]


def streamed(media_type: str, description: str) -> dict:
    """The 200 of a route that streams bytes rather than JSON, declared as what it is."""
    schema = {"type": "string"} if media_type.startswith("text/") else {"type": "string", "format": "binary"}
    return {200: {"description": description, "content": {media_type: {"schema": schema}}}}
