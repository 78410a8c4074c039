from fastapi import APIRouter
from sqlalchemy import select

from api.deps import DbSession
from shared.ids import now
from shared.jobs import state
from shared.jobs.models import Job
from shared.jobs.service import counts_by_status, recent_failures
from shared.queue import queue_depth
from shared.workers.models import WorkerHeartbeat

router = APIRouter(prefix="/admin", tags=["admin"])


@router.get("/overview")
def overview(session: DbSession):
    try:
        depth = queue_depth()
    except Exception:  # the broker being away must not take the overview down with it
        depth = None
    workers = session.scalars(select(WorkerHeartbeat).order_by(WorkerHeartbeat.hostname))
    return {
        "jobs_by_status": counts_by_status(session),
        "queue_depth": depth,
        "workers": [
            {
                "hostname": w.hostname,
                "pid": w.pid,
                "started_at": w.started_at,
                "last_heartbeat": w.last_heartbeat,
                "seconds_since_heartbeat": now() - w.last_heartbeat,
                "current_jobs": w.current_jobs,
            }
            for w in workers
        ],
        "running": [
            {
                "id": j.id,
                "worker": j.worker,
                "attempt": j.attempt,
                "lease_seconds_left": j.lease_expires_at - now() if j.lease_expires_at else None,
                "step": (j.progress or {}).get("step"),
                "total_steps": (j.progress or {}).get("total_steps"),
            }
            for j in session.scalars(select(Job).where(Job.status == state.RUNNING).order_by(Job.started_at))
        ],
        "recent_failures": [
            {"id": j.id, "model": j.model, "finished_at": j.finished_at, "error": j.error}
            for j in recent_failures(session)
        ],
    }
