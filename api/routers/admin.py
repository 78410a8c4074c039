"""Admin routes (admin keys only): the cross-tenant view and actions behind the dashboard, and API keys.
/v1 stays scoped to the key's own tenant even for admins, so an SDK script never sees other tenants by
accident; crossing tenants is explicit, here."""

from typing import Literal

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from sqlalchemy.orm import Session

from api.deps import After, DbSession, ReadSession, StorageDep
from api.docs import streamed
from api.errors import declare
from shared import quotas
from shared.auth import service as keys
from shared.ids import now
from shared.jobs import service as jobs
from shared.jobs.schemas import FineTuningJob, TenantJob
from shared.jobs.status import JobStatus
from shared.pagination import Listing, Page
from shared.queue import queue_depths
from shared.settings import get_settings
from shared.workers import service as workers

TENANT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # what `keys create --tenant` accepts; filters take the same

router = APIRouter(prefix="/admin", tags=["admin"], responses=declare(403, 409))


@router.get("/overview")
def overview(session: DbSession):
    try:
        depths = queue_depths()
    except Exception:  # the broker being away must not take the overview down with it
        depths = None
    return {
        "jobs_by_status": jobs.counts_by_status(session),
        "queue_depth": None if depths is None else sum(depths.values()),
        "queue_depths": depths,  # by queue: validation, then training by device class
        "workers": [
            {
                "hostname": w.hostname,
                "pid": w.pid,
                "started_at": w.started_at,
                "last_heartbeat": w.last_heartbeat,
                "seconds_since_heartbeat": now() - w.last_heartbeat,
                "current_jobs": w.current_jobs,
                "slots": (w.info or {}).get("slots"),  # kind, total, free, device ids
                "role": (w.info or {}).get("role", "training"),
                # an inference worker's endpoint, the bases and adapters it holds, requests in flight, memory
                "serving": _serving(w.info or {}),
            }
            for w in workers.list_workers(session)
        ],
        "running": [
            {
                "id": j.id,
                "tenant": j.tenant,
                "worker": j.worker,
                "attempt": j.attempt,
                "lease_seconds_left": j.lease_expires_at - now() if j.lease_expires_at else None,
                "step": (j.progress or {}).get("step"),
                "total_steps": (j.progress or {}).get("total_steps"),
            }
            for j in jobs.running_jobs(session)
        ],
        "recent_failures": [
            {"id": j.id, "tenant": j.tenant, "model": j.model, "finished_at": j.finished_at, "error": j.error}
            for j in jobs.recent_failures(session)
        ],
        "storage": storage_overview(session),
    }


def storage_overview(session: Session) -> dict:
    """Each tenant's stored bytes and files against the quota, fullest first: who is about to be refused."""
    settings = get_settings()
    quota = settings.storage_quota_bytes
    held = sorted(quotas.usage_by_tenant(session).items(), key=lambda item: (-item[1].bytes, item[0]))
    return {
        "quota_bytes": quota,
        "max_files_per_tenant": settings.max_files_per_tenant,
        "tenants": [
            {
                "tenant": tenant,
                "bytes": usage.bytes,
                "files": usage.files,
                "quota_used": round(usage.bytes / quota, 4) if quota else None,
            }
            for tenant, usage in held
        ],
    }


class TenantSummary(BaseModel):
    tenant: str
    jobs_by_status: dict[str, int] = Field(description="Only the statuses the tenant has jobs in")


@router.get("/tenants", response_model=Listing[TenantSummary])
def tenants(session: DbSession):
    """Every tenant with jobs or keys, and its jobs by status."""
    counts = jobs.counts_by_tenant(session)
    for key in keys.list_keys(session):
        counts.setdefault(key.tenant, {})
    return Listing[TenantSummary](data=[TenantSummary(tenant=t, jobs_by_status=c) for t, c in sorted(counts.items())])


@router.get("/jobs", response_model=Page[TenantJob])
def list_all_jobs(
    session: ReadSession,
    tenant: str | None = Query(None, pattern=TENANT_NAME),
    status: JobStatus | None = None,
    after: After = None,
    limit: int = Query(20, ge=1, le=100),
):
    selected = jobs.list_jobs(session, tenant, after=after, limit=limit + 1, status=status)
    return Page[TenantJob].of(selected, limit, TenantJob.of).with_ids()


@router.post("/jobs/{job_id}/cancel", response_model=FineTuningJob)
def cancel_any_job(session: DbSession, job_id: str):
    return FineTuningJob.of(jobs.cancel_job(session, None, job_id))


@router.get(
    "/jobs/{job_id}/attempts/{attempt}/log",
    response_class=StreamingResponse,
    responses={**declare(404), **streamed("text/plain", "what the attempt printed")},
)
def any_attempt_log(session: DbSession, storage: StorageDep, job_id: str, attempt: int):
    """What one attempt of any tenant's job printed (the recipe's output, every rank's stderr), as text."""
    key = jobs.attempt_log_key(storage, jobs.get_job(session, None, job_id), attempt)
    return StreamingResponse(storage.iter_chunks(key), media_type="text/plain; charset=utf-8")


class KeyObject(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    tenant: str
    name: str | None
    admin: bool
    prefix: str = Field(description="The secret's first characters, to tell keys apart")
    created_at: int
    revoked_at: int | None
    expires_at: int | None = Field(default=None, description="Refused after this time; null: until revoked")


class CreatedKey(KeyObject):
    secret: str = Field(description="Shown once, here; only its hash is stored")


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant: str = Field(pattern=TENANT_NAME, examples=["acme"])
    admin: StrictBool = False
    name: str | None = Field(default=None, max_length=128, pattern=r"^[^\x00-\x1f\x7f]*$")
    expires_in_seconds: int | None = Field(
        default=None, gt=0, le=keys.MAX_EXPIRES_IN, description="Refuse the key after this many seconds; null: never"
    )


@router.get("/keys", response_model=Listing[KeyObject])
def list_keys(session: DbSession, tenant: str | None = Query(None, pattern=TENANT_NAME)):
    return Listing[KeyObject](data=[KeyObject(**keys.describe(k)) for k in keys.list_keys(session, tenant)])


@router.post("/keys", response_model=CreatedKey)
def create_key(session: DbSession, request: KeyCreate):
    key, secret = keys.create_key(
        session, request.tenant, admin=request.admin, name=request.name, expires_in=request.expires_in_seconds
    )
    return {**keys.describe(key), "secret": secret}  # shown once


@router.delete("/keys/{key_id}", response_model=KeyObject)
def revoke_key(session: DbSession, key_id: str):
    return keys.describe(keys.revoke_key(session, key_id))


def _serving(info: dict) -> dict | None:
    if info.get("role") != "inference":
        return None
    fields = ("endpoint", "bases", "in_flight", "quantization", "devices", "rss_bytes", "peak_rss_bytes")
    return {name: info.get(name) for name in fields}
