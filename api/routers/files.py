from typing import Annotated, Literal

from fastapi import APIRouter, Form, Header, Query, UploadFile
from fastapi.responses import StreamingResponse

from api.deps import After, DbSession, ReadSession, SettingsDep, StorageDep, Tenant
from api.docs import streamed
from api.downloads import content_disposition
from api.errors import declare
from api.limits import MULTIPART_OVERHEAD
from shared.checksums import iter_file_chunks, sha256_stream
from shared.files import service
from shared.files.schemas import FileDeleted, FileObject
from shared.idempotency.service import idempotent, request_fingerprint
from shared.pagination import Page
from shared.quotas import check_upload

router = APIRouter(prefix="/v1/files", tags=["files"], responses=declare(409))


@router.post("", response_model=FileObject, responses=declare(413, 429))
def create_file(
    session: DbSession,
    storage: StorageDep,
    settings: SettingsDep,
    tenant: Tenant,
    file: UploadFile,
    purpose: Literal["fine-tune"] = Form(..., description="Only `fine-tune` files are accepted"),
    idempotency_key: Annotated[str | None, Header()] = None,
    content_length: Annotated[int | None, Header(include_in_schema=False)] = None,
):
    """Uploads of one tenant in flight at once are bounded (429); the storage quota is checked first with the
    declared Content-Length (the file is at least that, less the form around it), then with the exact size."""

    def create() -> dict:
        created = service.create_file(
            session,
            storage,
            tenant=tenant,
            stream=file.file,
            filename=file.filename or "upload.jsonl",
            purpose=purpose,
            max_bytes=settings.max_upload_bytes,
            max_lines=settings.max_file_lines,
            max_line_bytes=settings.max_line_bytes,
            max_messages=settings.max_messages_per_example,
        )
        return FileObject.of(created).model_dump(mode="json")

    with service.UPLOADS.hold(tenant, settings.max_concurrent_uploads_per_tenant):
        if content_length is not None:
            check_upload(session, tenant, max(0, content_length - MULTIPART_OVERHEAD))
        fingerprint = None
        if idempotency_key is not None:
            fingerprint = request_fingerprint(purpose, file.filename, upload_sha256(file))
        return idempotent(session, tenant, idempotency_key, "POST /v1/files", fingerprint or "", create)


def upload_sha256(file: UploadFile) -> str:
    digest = sha256_stream(iter_file_chunks(file.file))
    file.file.seek(0)
    return digest


@router.get("", response_model=Page[FileObject])
def list_files(
    session: ReadSession,
    tenant: Tenant,
    purpose: str | None = None,
    after: After = None,
    limit: int = Query(10000, ge=1, le=10000),
    order: Literal["asc", "desc"] = "desc",
):
    files = service.list_files(session, tenant, purpose=purpose, after=after, limit=limit + 1, order=order)
    return Page[FileObject].of(files, limit, FileObject.of).with_ids()


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(session: ReadSession, tenant: Tenant, file_id: str):
    return FileObject.of(service.get_file(session, tenant, file_id))


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(session: DbSession, storage: StorageDep, tenant: Tenant, file_id: str):
    return FileDeleted(id=service.delete_file(session, storage, tenant, file_id).id)


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses=streamed("application/octet-stream", "the file's bytes, as uploaded"),
)
def file_content(session: DbSession, storage: StorageDep, tenant: Tenant, file_id: str):
    file = service.get_file(session, tenant, file_id)
    return StreamingResponse(
        service.file_content(storage, file),
        media_type="application/octet-stream",
        headers={"Content-Disposition": content_disposition(file.filename)},
    )
