"""The service's Prometheus metrics (docs/metrics.md): what the API counts itself (its requests) and what it
reads from the database when scraped (jobs, workers, webhook deliveries; `shared.monitoring`).

Requests are counted by the process that serves them. `tunequeue serve --workers N` runs N such processes and
a scrape reaches one of them, so each process writes its counts to a folder shared with the others
(PROMETHEUS_MULTIPROC_DIR, prometheus_client's multiprocess mode, set up by `tunequeue serve`) and a scrape adds
up the whole folder: Prometheus sees one server, whichever process answers. Without the folder (the API run
any other way: `uvicorn api.app:app`, tests) the counts are this process's own. Either way the same metrics
are exposed, and only these: no per-process ones (`process_*`), which could not be added up."""

import logging
import os
import time
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest, values
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy.orm import Session
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import monitoring
from shared.ids import now
from shared.jobs import service as jobs
from shared.queue import queue_depth
from shared.settings import get_settings

log = logging.getLogger("tunequeue.api")

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
UNMATCHED = "unmatched"  # the route label of a request no route matched: any path, one series
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # any other: "other"

# Seconds. Requests: the job poll answers in milliseconds, an upload may take many seconds.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Jobs' times are whole seconds in their rows: from half a minute to three days.
JOB_DURATION_BUCKETS = (30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400, 259200)
QUEUE_WAIT_BUCKETS = (1, 5, 15, 30, 60, 300, 600, 1800, 3600, 7200, 21600, 86400)


def _multiprocess_folder() -> str | None:
    """The shared folder, checked once at import: prometheus_client chose where counts go when it was imported,
    and a folder named after that, or one that is missing, would lose every count without a word."""
    folder = os.environ.get(MULTIPROCESS_ENV)
    if not folder:
        return None
    if not os.path.isdir(folder):
        raise RuntimeError(f"{MULTIPROCESS_ENV}={folder!r} is not a folder; create it (empty) or unset it")
    if not values.ValueClass._multiprocess:
        raise RuntimeError(
            f"{MULTIPROCESS_ENV} was set after prometheus_client was imported in this process; set it before "
            "the process starts (`tunequeue serve` does)"
        )
    return folder


MULTIPROCESS_FOLDER = _multiprocess_folder()
# No `_created` series: the multiprocess mode has none, and both modes expose the same series.
disable_created_metrics()
LIVE = CollectorRegistry()  # this process's own counts (read from the shared folder instead, when there is one)
LABELS = ("method", "route", "status")
REQUESTS = Counter(
    "tunequeue_http_requests",
    "HTTP requests answered, by method, route template and status code",
    LABELS,
    registry=LIVE,
)
REQUEST_SECONDS = Histogram(
    "tunequeue_http_request_duration_seconds",
    "Seconds from a request's arrival to its response's status line (a streamed body's transfer not included)",
    LABELS,
    buckets=REQUEST_BUCKETS,
    registry=LIVE,
)


class RequestMetrics:
    """Counts every HTTP request and how long it took to answer, labelled by method, route template (never the
    raw path, which carries ids) and status. The time runs to the response's status line, so that a download or
    an event stream, whose length is the client's, does not read as a slow answer. A request that raised before
    answering is counted as the 500 that the error middleware outside this one sends."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        arrived = time.perf_counter()
        root_path = scope.get("root_path", "")
        answered = False

        async def send_and_count(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start" and not answered:
                answered = True
                count_request(scope, root_path, message["status"], time.perf_counter() - arrived)
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        except Exception:
            if not answered:
                count_request(scope, root_path, 500, time.perf_counter() - arrived)
            raise


_series: dict[tuple[str, str, int], tuple] = {}  # (method, route, status) → its counter and histogram


def count_request(scope: Scope, root_path: str, status: int, seconds: float) -> None:
    method = scope["method"] if scope["method"] in METHODS else "other"
    key = (method, route_template(scope, root_path), status)
    series = _series.get(key)
    if series is None:  # labels() validates and locks: once per series, not per request
        labels = (key[0], key[1], str(status))
        series = _series.setdefault(key, (REQUESTS.labels(*labels), REQUEST_SECONDS.labels(*labels)))
    series[0].inc()
    series[1].observe(seconds)


def route_template(scope: Scope, root_path: str) -> str:
    """The path template of what answered, e.g. `/v1/fine_tuning/jobs/{job_id}`, or UNMATCHED; never the raw
    path of a route with parameters. The router leaves the route it chose in the scope (FastAPI: its routes),
    and a mount moves its own path into `root_path`: a mounted app (static files) is its path and `{path}`. A
    plain route without parameters (/docs, /openapi.json) leaves only its endpoint: its path is its template."""
    mounted = scope.get("root_path", "")[len(root_path) :]
    route = scope.get("route")
    if isinstance(route, Mount) or (route is None and mounted):
        return mounted + "/{path}"
    template = getattr(route, "path_format", None)
    if template is not None:
        return mounted + template
    if scope.get("endpoint") is not None and not scope.get("path_params"):
        path = scope["path"]
        return path[len(root_path) :] if path.startswith(root_path) else path
    return UNMATCHED


class DatabaseFigures:
    """The figures read from the database (and the broker's queue depth) when scraped: a handful of aggregate
    queries per scrape, however many jobs, workers or deliveries there are."""

    def __init__(self, session: Session):
        self.session = session

    def collect(self) -> Iterator[Metric]:
        yield from self.jobs()
        yield from self.queue()
        yield from self.workers()
        yield from self.webhooks()

    def jobs(self) -> Iterator[Metric]:
        by_status = GaugeMetricFamily("tunequeue_jobs", "Jobs by status", labels=["status"])
        for status, count in jobs.counts_by_status(self.session).items():
            by_status.add_metric([status], count)
        yield by_status
        finished = monitoring.finished_jobs(self.session, JOB_DURATION_BUCKETS, QUEUE_WAIT_BUCKETS)
        duration = HistogramMetricFamily(
            "tunequeue_job_duration_seconds",
            "Seconds from the start of a finished job's last attempt to its end, by final status",
            labels=["status"],
        )
        for status, figures in finished.items():
            duration.add_metric([status], histogram_buckets(figures.duration), figures.duration.total)
        yield duration
        waits = [figures.queue_wait for figures in finished.values()]
        wait = HistogramMetricFamily(
            "tunequeue_job_queue_wait_seconds",
            "Seconds from a finished job's submission to the start of its last attempt (validation included)",
        )
        wait.add_metric([], histogram_buckets(*waits), sum(w.total for w in waits))
        yield wait
        tokens = sum(figures.trained_tokens for figures in finished.values())
        yield CounterMetricFamily("tunequeue_trained_tokens", "Tokens trained by jobs that succeeded", value=tokens)

    def queue(self) -> Iterator[Metric]:
        depth = broker_queue_depth()
        yield GaugeMetricFamily(
            "tunequeue_broker_up", "1 if the broker answered this scrape, else 0", value=int(depth is not None)
        )
        if depth is not None:
            yield GaugeMetricFamily(
                "tunequeue_queue_messages", "Messages waiting in the validation and training queues", value=depth
            )

    def workers(self) -> Iterator[Metric]:
        """Workers heard from within a lease: one silent for longer has lost its jobs to the sweeper, and counts
        as gone here too."""
        live = monitoring.live_worker_slots(self.session, now() - int(get_settings().lease_seconds))
        yield GaugeMetricFamily("tunequeue_workers", "Workers heard from within a job lease", value=len(live))
        total = GaugeMetricFamily(
            "tunequeue_worker_slots", "Device slots of each live worker", labels=["worker", "kind"]
        )
        free = GaugeMetricFamily(
            "tunequeue_worker_slots_free",
            "Device slots of each live worker not running a job",
            labels=["worker", "kind"],
        )
        for worker in live:
            total.add_metric([worker.worker, worker.kind], worker.total)
            free.add_metric([worker.worker, worker.kind], worker.free)
        yield total
        yield free

    def webhooks(self) -> Iterator[Metric]:
        """Gauges, not counters: deleting an endpoint deletes its deliveries, so these can fall, and a counter that
        falls reads to Prometheus as a restart (a false burst in `rate`)."""
        counts = monitoring.webhook_deliveries(self.session)
        deliveries = GaugeMetricFamily(
            "tunequeue_webhook_deliveries", "Webhook deliveries recorded, by status", labels=["status"]
        )
        for status, figures in counts.items():
            deliveries.add_metric([status], figures.deliveries)
        yield deliveries
        attempts = sum(figures.attempts for figures in counts.values())
        yield GaugeMetricFamily(
            "tunequeue_webhook_failed_attempts",
            "Failed send attempts recorded on webhook deliveries (retried or given up)",
            value=attempts - counts["delivered"].deliveries,
        )


def histogram_buckets(*distributions: monitoring.Distribution) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs, +Inf last, of one distribution or several with the same bounds added up."""
    bounds = distributions[0].bounds
    counts = [sum(d.at_or_below[i] for d in distributions) for i in range(len(bounds))]
    pairs = [(floatToGoString(bound), float(count)) for bound, count in zip(bounds, counts, strict=True)]
    return [*pairs, ("+Inf", float(sum(d.count for d in distributions)))]


def broker_queue_depth() -> int | None:
    """None when the broker cannot say: the other figures are still worth a scrape."""
    try:
        return queue_depth()
    except Exception as exc:
        log.warning("metrics: broker unavailable for the queue depth: %s", exc)
        return None


class _Scrape:
    def __init__(self, *collectors: Collector):
        self.collectors = collectors

    def collect(self) -> Iterable[Metric]:
        for collector in self.collectors:
            yield from collector.collect()


def exposition(session: Session) -> bytes:
    """The text exposition of every metric: the requests of every API process (or of this one alone, without the
    shared folder) and the figures read from the database now."""
    requests: Collector = MultiProcessCollector(None, MULTIPROCESS_FOLDER) if MULTIPROCESS_FOLDER else LIVE
    return generate_latest(_Scrape(requests, DatabaseFigures(session)))
