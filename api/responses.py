"""Responses the hottest read routes render themselves. A model built by its `of` is already valid: FastAPI
would validate it again against `response_model` (for a sync route, on a second trip through the thread
pool) before rendering it. The routes keep `response_model` for the OpenAPI document."""

from fastapi.responses import Response
from pydantic import BaseModel


def rendered(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")
