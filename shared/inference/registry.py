"""Inference workers as the database knows them: a heartbeat row each (in `workers`, with `role: inference`)
saying where the worker listens and what it holds. The API routes a request to the workers that hold the
request's adapter first, then to those that hold its base, then to any other, the least busy first."""

import dataclasses

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from shared.ids import now
from shared.workers.models import WorkerHeartbeat
from shared.workers.service import record_heartbeat

ROLE = "inference"
# A worker stays routable this long after its last heartbeat: loading a base model can hold the interpreter
# for many seconds, and a worker that is really gone costs only a refused connection (the next one is tried).
STALE_AFTER_BEATS = 3
STALE_AFTER_AT_LEAST_SECONDS = 60


@dataclasses.dataclass(frozen=True)
class Endpoint:
    name: str
    url: str
    holds_base: bool
    holds_adapter: bool
    in_flight: int


def record_endpoint(
    session: Session, name: str, *, pid: int, started_at: int, url: str, models: list[str] | None, held: dict
) -> None:
    """`held`: {"bases": {base: [adapter, ...]}, "in_flight": n, ...} as the engine describes itself."""
    info = {"role": ROLE, "endpoint": url, "models": models, **held}
    record_heartbeat(session, name, pid=pid, started_at=started_at, current_jobs=[], info=info)


def forget(session: Session, name: str) -> None:
    session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.hostname == name))


def endpoints_for(session: Session, base: str, adapter: str | None, *, heartbeat_seconds: float) -> list[Endpoint]:
    """The live inference workers that may serve `base` (all, unless a worker is pinned to other models), best
    first: holding the adapter, then holding the base, then the fewest requests in flight."""
    since = now() - int(max(heartbeat_seconds * STALE_AFTER_BEATS, STALE_AFTER_AT_LEAST_SECONDS)) - 1
    rows = session.scalars(select(WorkerHeartbeat).where(WorkerHeartbeat.last_heartbeat >= since))
    found = []
    for row in rows:
        info = row.info or {}
        if info.get("role") != ROLE or not info.get("endpoint"):
            continue
        if info.get("models") and base not in info["models"]:
            continue
        held = (info.get("bases") or {}).get(base)
        found.append(
            Endpoint(
                name=row.hostname,
                url=info["endpoint"],
                holds_base=held is not None,
                holds_adapter=adapter is not None and adapter in (held or []),
                in_flight=int(info.get("in_flight") or 0),
            )
        )
    return sorted(found, key=lambda e: (not e.holds_adapter, not e.holds_base, e.in_flight, e.name))
