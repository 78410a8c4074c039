"""Per-tenant storage quota: the bytes a tenant holds in object storage (its files, its jobs' checkpoints and
adapters) and the number of its files, checked before anything new is stored.

Each stored object counts once, by the size recorded when it was written: a live file's `bytes`, a checkpoint's
`bytes` (resume states saved at a pause are checkpoints too), a delivered adapter's `adapter_bytes` while its
model is not deleted, a made export's `bytes`. The delivered adapter also has a checkpoint row naming the same
object; that row is not counted again. Attempt logs and completion markers are small and not counted."""

from dataclasses import dataclass

from sqlalchemy import Select, func, literal, or_, select
from sqlalchemy.orm import Session

from shared.errors import RateLimited, TunequeueError
from shared.exports.models import Export
from shared.files.models import File
from shared.jobs.models import Checkpoint, Job
from shared.settings import get_settings


class QuotaExceeded(TunequeueError):
    status_code = 413
    code = "storage_quota_exceeded"


@dataclass(frozen=True)
class Usage:
    bytes: int = 0
    files: int = 0


def usage(session: Session, tenant: str) -> Usage:
    """What a tenant holds now: live files, checkpoints still stored, delivered adapters of models not deleted."""
    return usage_by_tenant(session, tenant).get(tenant, Usage())


def usage_by_tenant(session: Session, tenant: str | None = None) -> dict[str, Usage]:
    """Every tenant that holds something (only `tenant`, when given), in three grouped queries."""
    files = select(File.tenant, func.sum(File.bytes), func.count(File.id)).where(File.deleted.is_(False))
    checkpoints = (
        select(Job.tenant, func.sum(Checkpoint.bytes), literal(0))
        .join(Job, Job.id == Checkpoint.job_id)
        .where(or_(Job.adapter_key.is_(None), Checkpoint.storage_key != Job.adapter_key))
    )
    adapters = select(Job.tenant, func.sum(Job.adapter_bytes), literal(0)).where(Job.model_deleted_at.is_(None))
    # An `adapter` export names the adapter's own object: counted above.
    exports = select(Export.tenant, func.sum(Export.bytes), literal(0)).where(Export.format != "adapter")
    held: dict[str, Usage] = {}
    sources = ((files, File.tenant), (checkpoints, Job.tenant), (adapters, Job.tenant), (exports, Export.tenant))
    for query, owner in sources:
        for name, size, count in session.execute(_of_tenant(query, owner, tenant).group_by(owner)):
            before = held.get(name, Usage())
            held[name] = Usage(before.bytes + int(size or 0), before.files + int(count or 0))
    return held


def _of_tenant(query: Select, owner, tenant: str | None) -> Select:
    return query if tenant is None else query.where(owner == tenant)


def check_upload(session: Session, tenant: str, incoming_bytes: int) -> None:
    """Refuse a new file that would take the tenant past its quota (413) or its file count (429), naming the
    setting to raise."""
    settings = get_settings()
    held = usage(session, tenant)
    if held.files >= settings.max_files_per_tenant:
        raise RateLimited(
            f"tenant holds {held.files} files, the most allowed (TUNEQUEUE_MAX_FILES_PER_TENANT="
            f"{settings.max_files_per_tenant}); delete files you no longer need",
            retry_after=60,
            param="file",
        )
    if held.bytes + incoming_bytes > settings.storage_quota_bytes:
        raise QuotaExceeded(
            f"storing {incoming_bytes} more bytes would take the tenant to {held.bytes + incoming_bytes} bytes, over "
            f"its storage quota of {settings.storage_quota_bytes} (TUNEQUEUE_STORAGE_QUOTA_BYTES); delete files "
            "or fine-tuned models you no longer need",
            param="file",
        )


def check_room(session: Session, tenant: str) -> None:
    """Refuse new work (a job stores checkpoints and an adapter) once the tenant is at or over its quota (413).
    A job's size is not known before it trains, so a tenant under its quota may start one that takes it
    over; the next job is then refused until the tenant frees space."""
    quota = get_settings().storage_quota_bytes
    held = usage(session, tenant)
    if held.bytes >= quota:
        raise QuotaExceeded(
            f"the tenant holds {held.bytes} bytes, at or over its storage quota of {quota} "
            "(TUNEQUEUE_STORAGE_QUOTA_BYTES); delete files or fine-tuned models you no longer need, then create "
            "the job again"
        )
