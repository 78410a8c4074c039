import logging

from fastapi import Depends, FastAPI

from api import docs, errors, ui
from api.deps import principal, require_admin
from api.limits import BodyLimit
from api.metrics import RequestMetrics
from api.routers import admin, exports, files, health, inference, jobs, metrics, models, webhooks
from shared.jobs import state
from shared.webhooks.service import record_job_transition


def create_app() -> FastAPI:
    state.after_transition(record_job_transition)  # jobs created or cancelled here reach webhooks
    app = FastAPI(
        title="tunequeue",
        version="0.1.0",
        description="Self-hosted QLoRA fine-tuning with OpenAI's fine-tuning API.",
        # Any route may answer these: a bad request, a missing key, an unknown id, a body over its limit, an
        # unexpected error, or the database or storage being away. Routers add their own (403, 409, 422, 429).
        responses=errors.declare(400, 401, 404, 413, 500, 503),
        docs_url=None,
        redoc_url=None,
    )
    docs.install(app)
    errors.install(app)
    app.add_middleware(BodyLimit)
    app.add_middleware(RequestMetrics)  # counts BodyLimit's refusals, and the 500s RequestIds renders
    app.add_middleware(errors.RequestIds)  # added last: the outermost, so every response carries its id
    for router in (files.router, jobs.router, exports.router, models.router, webhooks.router, inference.router):
        app.include_router(router, dependencies=[Depends(principal)])
    app.include_router(admin.router, dependencies=[Depends(require_admin)])
    app.include_router(metrics.router, dependencies=[Depends(require_admin)])
    app.include_router(health.router)
    ui.install(app)  # the dashboard, after errors.install: its pages answer errors as pages
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return app


app = create_app()
