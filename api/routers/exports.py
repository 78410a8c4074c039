"""tunequeue's own: a succeeded job's model exported (`shared.exports.service`, `docs/export.md`)."""

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from api.deps import After, DbSession, ReadSession, StorageDep, Tenant
from api.docs import streamed
from api.downloads import content_disposition
from api.errors import declare
from shared.exports import service
from shared.exports.models import Export
from shared.exports.schemas import ExportCreate, ExportObject
from shared.pagination import Page

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["exports"], responses=declare(409, 422, 429))


def shown(export: Export) -> ExportObject:
    return ExportObject.of(export, *service.shown(export))


@router.post("/{job_id}/exports", response_model=ExportObject, responses=declare(404, 413))
def create_export(session: DbSession, tenant: Tenant, job_id: str, request: ExportCreate):
    """Export the job's model: `merged` (safetensors in `dtype`, made on a training worker, its fidelity
    measured against the model as trained) or `adapter` (the adapter's zip, at once). 409 unless the job has
    succeeded. The same export asked for again returns the one on its way, or made."""
    return shown(service.create_export(session, tenant, job_id, request))


@router.get("/{job_id}/exports", response_model=Page[ExportObject])
def list_exports(
    session: ReadSession, tenant: Tenant, job_id: str, after: After = None, limit: int = Query(20, ge=1, le=100)
):
    exports = service.list_exports(session, tenant, job_id, after=after, limit=limit + 1)
    return Page[ExportObject].of(exports, limit, shown).with_ids()


@router.get("/{job_id}/exports/{export_id}", response_model=ExportObject)
def get_export(session: ReadSession, tenant: Tenant, job_id: str, export_id: str):
    return shown(service.get_export(session, tenant, job_id, export_id))


@router.get(
    "/{job_id}/exports/{export_id}/content",
    response_class=StreamingResponse,
    responses=streamed("application/zip", "the export as a zip; its sha256 in X-Export-SHA256"),
)
def export_content(session: DbSession, storage: StorageDep, tenant: Tenant, job_id: str, export_id: str):
    """The export's zip: a merged model's folder (weights, config, tokenizer, `tunequeue_export.json`), or the
    adapter's zip. 409 until it has succeeded."""
    export = service.export_content(session, tenant, job_id, export_id)
    assert export.storage_key is not None
    return StreamingResponse(
        storage.iter_chunks(export.storage_key),
        media_type="application/zip",
        headers={
            "Content-Disposition": content_disposition(f"{job_id}-{export.format}-{export.id}.zip"),
            "X-Export-SHA256": export.sha256 or "",
        },
    )
