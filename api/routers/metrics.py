"""`GET /metrics` for Prometheus (admin keys only: the figures span every tenant). Every metric, and how to
scrape it with a key: docs/metrics.md."""

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.deps import ReadSession
from api.docs import streamed
from api.errors import declare
from api.metrics import exposition

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={**declare(403), **streamed("text/plain", "Every metric, in Prometheus' text exposition format")},
)
def metrics(session: ReadSession) -> Response:
    """The API's requests (every `tunequeue serve` process's), and jobs, queue, workers and webhook deliveries as
    the database and the broker have them at this moment. A few aggregate queries per scrape."""
    return Response(exposition(session), media_type=CONTENT_TYPE_LATEST)
