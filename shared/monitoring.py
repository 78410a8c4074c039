"""What the service's metrics read from the database when they are scraped: jobs by status, the times and tokens
of finished jobs, the workers' device slots and the webhook deliveries. Workers report through the database
(heartbeats, job rows, delivery rows), so an API process reads every worker's figures here without reaching
any worker. Each function is one aggregate query whose cost does not grow with the number of workers or
endpoints; the job figures are bucketed in SQL, so that no job row is loaded into Python."""

from dataclasses import dataclass

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from shared.jobs import state
from shared.jobs.models import Job
from shared.webhooks.models import WebhookDelivery
from shared.workers.models import WorkerHeartbeat


@dataclass(frozen=True)
class Distribution:
    """Observations as a Prometheus histogram holds them: how many are at or below each bound (cumulative, so
    never decreasing), how many there are in all, and their sum."""

    bounds: tuple[float, ...]
    at_or_below: tuple[int, ...]
    count: int
    total: float


@dataclass(frozen=True)
class FinishedJobs:
    """The jobs that ended with one terminal status. A job's times are whole seconds from its row: `duration`
    from the start of its last attempt (`started_at`) to its end, `queue_wait` from its submission to that start
    (validation, waiting in the queue and any earlier attempts). Jobs that never started (failed in validation,
    cancelled while waiting) have neither. Finished jobs never change, so these only grow."""

    status: str
    duration: Distribution
    queue_wait: Distribution
    trained_tokens: int


def finished_jobs(
    session: Session, duration_bounds: tuple[float, ...], wait_bounds: tuple[float, ...]
) -> dict[str, FinishedJobs]:
    """Every terminal status, with zeros for one no job has yet, in one grouped query: one row per status."""
    duration = Job.finished_at - Job.started_at
    wait = Job.started_at - Job.created_at
    query = (
        select(
            Job.status,
            func.count(duration),
            func.coalesce(func.sum(duration), 0),
            func.count(wait),
            func.coalesce(func.sum(wait), 0),
            func.coalesce(func.sum(Job.trained_tokens), 0),
            *_at_or_below(duration, duration_bounds),
            *_at_or_below(wait, wait_bounds),
        )
        .where(Job.status.in_(state.TERMINAL))
        .group_by(Job.status)
    )
    found: dict[str, FinishedJobs] = {
        status: FinishedJobs(status, _nothing(duration_bounds), _nothing(wait_bounds), 0)
        for status in sorted(state.TERMINAL)
    }
    for row in session.execute(query):
        status, durations, duration_sum, waits, wait_sum, tokens, *buckets = row
        found[status] = FinishedJobs(
            status,
            Distribution(duration_bounds, _ints(buckets[: len(duration_bounds)]), durations, float(duration_sum)),
            Distribution(wait_bounds, _ints(buckets[len(duration_bounds) :]), waits, float(wait_sum)),
            int(tokens),
        )
    return found


def _at_or_below(value: ColumnElement, bounds: tuple[float, ...]) -> list[ColumnElement]:
    # A NULL value (a job that never started) is in no bucket, as it is in no count.
    return [func.count().filter(value <= bound) for bound in bounds]


def _nothing(bounds: tuple[float, ...]) -> Distribution:
    return Distribution(bounds, (0,) * len(bounds), 0, 0.0)


def _ints(values: list) -> tuple[int, ...]:
    return tuple(int(value) for value in values)


@dataclass(frozen=True)
class WorkerSlots:
    worker: str  # the worker's name, as its jobs' leases carry it (pid@host)
    kind: str  # "gpu" or "cpu"
    total: int
    free: int


def live_worker_slots(session: Session, heard_since: int) -> list[WorkerSlots]:
    """The device slots of the workers heard from since `heard_since`, as their last heartbeat reported them.
    A worker that stopped long ago keeps its row, and is left out here."""
    rows = session.execute(
        select(WorkerHeartbeat.hostname, WorkerHeartbeat.info)
        .where(WorkerHeartbeat.last_heartbeat >= heard_since)
        .order_by(WorkerHeartbeat.hostname)
    )
    found = []
    for hostname, info in rows:
        slots = (info or {}).get("slots") or {}  # a worker started before it reported slots has none
        kind, total, free = str(slots.get("kind", "unknown")), int(slots.get("total", 0)), int(slots.get("free", 0))
        found.append(WorkerSlots(hostname, kind, total, free))
    return found


@dataclass(frozen=True)
class DeliveryCounts:
    deliveries: int
    attempts: int


def webhook_deliveries(session: Session) -> dict[str, DeliveryCounts]:
    """Webhook deliveries by status (pending, delivered, failed), with the send attempts recorded on them. Every
    attempt but a delivered delivery's last one failed, so failed attempts = attempts - delivered deliveries."""
    rows = session.execute(
        select(WebhookDelivery.status, func.count(), func.coalesce(func.sum(WebhookDelivery.attempts), 0)).group_by(
            WebhookDelivery.status
        )
    )
    counts = {status: DeliveryCounts(0, 0) for status in ("pending", "delivered", "failed")}
    counts.update({status: DeliveryCounts(int(deliveries), int(attempts)) for status, deliveries, attempts in rows})
    return counts
