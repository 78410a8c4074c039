"""Workers as the database knows them: their heartbeats (who is alive, what it runs, its device slots) and
the record of which job held which device when. Services flush; the caller commits."""

import time

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.ids import now
from shared.jobs.models import Job  # the models only: shared.jobs' services import this module
from shared.workers.models import DeviceUsage, WorkerHeartbeat


def record_heartbeat(
    session: Session, hostname: str, *, pid: int, started_at: int, current_jobs: list[str], info: dict
) -> None:
    session.merge(
        WorkerHeartbeat(
            hostname=hostname,
            pid=pid,
            started_at=started_at,
            last_heartbeat=now(),
            current_jobs=current_jobs,
            info=info,
        )
    )
    session.flush()


def list_workers(session: Session) -> list[WorkerHeartbeat]:
    return list(session.scalars(select(WorkerHeartbeat).order_by(WorkerHeartbeat.hostname)))


def largest_slot_count(session: Session, *, seen_since: int) -> int:
    """The most device slots any worker heard from since `seen_since` reports; 0 if none was."""
    seen = session.scalars(select(WorkerHeartbeat).where(WorkerHeartbeat.last_heartbeat > seen_since))
    training = [w for w in seen if (w.info or {}).get("role") != "inference"]  # inference workers train nothing
    return max((int((w.info or {}).get("slots", {}).get("total", 1)) for w in training), default=0)


def largest_slot(session: Session, *, seen_since: int) -> dict | None:
    """The slot description (`worker.slots.Slots.describe`) of the training worker heard from since `seen_since`
    whose slots offer the most memory; None if none says how much."""
    seen = session.scalars(select(WorkerHeartbeat).where(WorkerHeartbeat.last_heartbeat > seen_since))
    slots = [(w.info or {}).get("slots") or {} for w in seen if (w.info or {}).get("role") != "inference"]
    sized = [s for s in slots if int(s.get("memory_bytes") or 0) > 0]
    return max(sized, key=lambda s: int(s["memory_bytes"]), default=None)


def start_device_usage(session: Session, worker: str, devices: list[str], job_id: str, attempt: int) -> list[int]:
    """One row per device ("gpu:0", "cpu:1") the attempt holds; returns their ids for `end_device_usage`."""
    started = _now_ms()
    rows = [
        DeviceUsage(worker=worker, device=device, job_id=job_id, attempt=attempt, started_at_ms=started)
        for device in devices
    ]
    session.add_all(rows)
    session.flush()
    return [row.id for row in rows]


def end_device_usage(session: Session, row_ids: list[int]) -> None:
    session.execute(update(DeviceUsage).where(DeviceUsage.id.in_(row_ids)).values(ended_at_ms=_now_ms()))


def _now_ms() -> int:
    return int(time.time() * 1000)


def device_seconds_by_tenant(session: Session) -> dict[str, int]:
    """Each tenant's device time, finished holds plus those still running: what its jobs have used."""
    held = func.coalesce(DeviceUsage.ended_at_ms, int(time.time() * 1000)) - DeviceUsage.started_at_ms
    rows = session.execute(
        select(Job.tenant, func.sum(held)).join(Job, Job.id == DeviceUsage.job_id).group_by(Job.tenant)
    )
    return {tenant: int((total or 0) // 1000) for tenant, total in rows}


def holds_of_job(session: Session, job_id: str) -> list[DeviceUsage]:
    """Which worker held which devices for each attempt of a job, in the order they were taken."""
    query = select(DeviceUsage).where(DeviceUsage.job_id == job_id).order_by(DeviceUsage.started_at_ms)
    return list(session.scalars(query))
