"""Per-tenant storage quota: the bytes a tenant holds in object storage (its files, its jobs' checkpoints and
adapters) and the number of its files, checked before anything new is stored."""

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.errors import RateLimited, TunequeueError
from shared.files.models import File
from shared.jobs.models import Checkpoint, Job
from shared.settings import get_settings


class QuotaExceeded(TunequeueError):
    status_code = 413
    code = "storage_quota_exceeded"


@dataclass(frozen=True)
class Usage:
    bytes: int
    files: int


def usage(session: Session, tenant: str) -> Usage:
    """What a tenant holds now: live files, checkpoints still stored, delivered adapters of models not deleted."""
    file_bytes, file_count = session.execute(
        select(func.coalesce(func.sum(File.bytes), 0), func.count(File.id)).where(
            File.tenant == tenant, File.deleted.is_(False)
        )
    ).one()
    checkpoint_bytes = session.scalar(
        select(func.coalesce(func.sum(Checkpoint.bytes), 0))
        .join(Job, Job.id == Checkpoint.job_id)
        .where(Job.tenant == tenant)
    )
    adapter_bytes = session.scalar(
        select(func.coalesce(func.sum(Job.adapter_bytes), 0)).where(
            Job.tenant == tenant, Job.model_deleted_at.is_(None)
        )
    )
    return Usage(bytes=int(file_bytes) + int(checkpoint_bytes or 0) + int(adapter_bytes or 0), files=int(file_count))


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
