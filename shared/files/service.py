"""Files: uploads streamed to storage with their sha256, checked line by line for the fine-tune purpose."""

import re
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from shared.datasets.validation import MAX_LINE_BYTES, validate_jsonl
from shared.files.errors import FileNotFound, FileTooLarge, InvalidFile
from shared.files.models import File
from shared.ids import new_id, now
from shared.storage import Storage, put_verified

UPLOAD_PURPOSES = ("fine-tune",)
RESULTS_PURPOSE = "fine-tune-results"


def create_file(
    session: Session,
    storage: Storage,
    *,
    tenant: str,
    stream: BinaryIO,
    filename: str,
    purpose: str,
    max_bytes: int,
    max_lines: int | None = None,
    max_line_bytes: int | None = None,
) -> File:
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidFile(f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}, got {purpose!r}", param="purpose")
    with tempfile.SpooledTemporaryFile(max_size=16 * 1024 * 1024) as spool:
        size = _copy_limited(stream, spool, max_bytes)  # type: ignore[arg-type]
        if size == 0:
            raise InvalidFile("the uploaded file is empty", param="file")
        spool.seek(0)
        report = validate_jsonl(spool.read(), max_lines=max_lines, max_line_bytes=max_line_bytes or MAX_LINE_BYTES)
        if not report.ok:
            raise InvalidFile(f"{filename}: {report.summary()}", param="file")
        spool.seek(0)
        file_id = new_id("file")
        key = f"tenants/{tenant}/files/{file_id}/{_safe_name(filename)}"
        sha256 = put_verified(storage, key, spool)  # type: ignore[arg-type]
    file = File(
        id=file_id,
        tenant=tenant,
        filename=clean_filename(filename),
        purpose=purpose,
        bytes=size,
        sha256=sha256,
        storage_key=key,
        line_count=report.examples,
        status="processed",
        created_at=now(),
        report=report.to_dict(),
    )
    session.add(file)
    session.flush()
    return file


def create_result_file(
    session: Session, storage: Storage, *, tenant: str, job_id: str, filename: str, data: bytes
) -> File:
    file_id = new_id("file")
    key = f"tenants/{tenant}/files/{file_id}/{_safe_name(filename)}"
    size, sha256 = len(data), put_verified(storage, key, data)
    file = File(
        id=file_id,
        tenant=tenant,
        filename=filename,
        purpose=RESULTS_PURPOSE,
        bytes=size,
        sha256=sha256,
        storage_key=key,
        line_count=data.count(b"\n"),
        created_at=now(),
    )
    session.add(file)
    session.flush()
    return file


def _copy_limited(source: BinaryIO, target: BinaryIO, max_bytes: int) -> int:
    size = 0
    while chunk := source.read(1024 * 1024):
        size += len(chunk)
        if size > max_bytes:
            raise FileTooLarge(f"the file is larger than the {max_bytes}-byte limit", param="file")
        target.write(chunk)
    return size


def clean_filename(filename: str) -> str:
    """What is shown and stored as the file's name: no control characters (a NUL cannot even be stored),
    no folders, at most 255 characters. Storage keys use `_safe_name` besides."""
    name = re.sub(r"[\x00-\x1f\x7f]", "", filename).replace("\\", "/").rsplit("/", 1)[-1].strip()
    return name[:255] or "upload.jsonl"


def _safe_name(filename: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", filename)[-100:] or "file"


def get_file(session: Session, tenant: str, file_id: str, param: str | None = None) -> File:
    file = session.get(File, file_id)
    if file is None or file.tenant != tenant or file.deleted:
        raise FileNotFound(file_id, param=param)
    return file


def list_files(
    session: Session, tenant: str, *, purpose: str | None, after: str | None, limit: int, order: str
) -> list[File]:
    query = select(File).where(File.tenant == tenant, File.deleted.is_(False))
    if purpose:
        query = query.where(File.purpose == purpose)
    descending = order != "asc"
    if after:
        cursor = get_file(session, tenant, after, param="after")
        if descending:
            query = query.where(tuple_(File.created_at, File.id) < tuple_(cursor.created_at, cursor.id))
        else:
            query = query.where(tuple_(File.created_at, File.id) > tuple_(cursor.created_at, cursor.id))
    ordering = (File.created_at.desc(), File.id.desc()) if descending else (File.created_at, File.id)
    return list(session.scalars(query.order_by(*ordering).limit(limit)))


def delete_file(session: Session, storage: Storage, tenant: str, file_id: str) -> File:
    file = get_file(session, tenant, file_id)
    file.deleted = True
    session.flush()
    storage.delete(file.storage_key)
    return file


def file_content(storage: Storage, file: File) -> Iterator[bytes]:
    return storage.iter_chunks(file.storage_key)
