import logging

from fastapi import FastAPI

from api import errors
from api.routers import admin, files, health, jobs, models


def create_app() -> FastAPI:
    app = FastAPI(
        title="tunequeue",
        version="0.1.0",
        description="Self-hosted QLoRA fine-tuning with OpenAI's fine-tuning API.",
    )
    errors.install(app)
    for router in (files.router, jobs.router, models.router, admin.router, health.router):
        app.include_router(router)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return app


app = create_app()
