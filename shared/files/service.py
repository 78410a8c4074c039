"""Files: uploads streamed to storage with their sha256, checked line by line for the fine-tune purpose.

An upload is read in chunks, each written to a spool file on disk and fed to the line validator as it goes:
memory holds a chunk and a line, never the file. Uploads in flight at once are bounded per tenant and per
process (`UploadSlots`), and the tenant's storage quota is checked before anything is stored."""

import re
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from shared.checksums import CHUNK
from shared.datasets.validation import MAX_LINE_BYTES, JsonlValidator
from shared.errors import RateLimited
from shared.files.errors import FileNotFound, FileTooLarge, InvalidFile
from shared.files.models import File
from shared.ids import new_id, now
from shared.quotas import check_upload
from shared.storage import Storage, put_verified

UPLOAD_PURPOSES = ("fine-tune",)
RESULTS_PURPOSE = "fine-tune-results"


class UploadSlots:
    """How many uploads each tenant has in flight in this process; one over the limit is refused, not queued,
    so that one tenant's uploads cannot take every request thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}

    @contextmanager
    def hold(self, tenant: str, limit: int) -> Iterator[None]:
        with self._lock:
            held = self._in_flight.get(tenant, 0)
            if held >= limit:
                raise RateLimited(
                    f"{held} of your uploads are in progress, the most at once (TUNEQUEUE_MAX_CONCURRENT_UPLOADS_"
                    f"PER_TENANT={limit}); retry when one has finished",
                    retry_after=5,
                    param="file",
                )
            self._in_flight[tenant] = held + 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight[tenant] -= 1
                if not self._in_flight[tenant]:
                    del self._in_flight[tenant]


UPLOADS = UploadSlots()


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
    max_messages: int | None = None,
) -> File:
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidFile(f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}, got {purpose!r}", param="purpose")
    validator = JsonlValidator(
        max_line_bytes=max_line_bytes or MAX_LINE_BYTES, max_lines=max_lines, max_messages=max_messages
    )
    with tempfile.TemporaryFile() as spool:
        size = _spool_validated(stream, spool, validator, max_bytes)
        if size == 0:
            raise InvalidFile("the uploaded file is empty", param="file")
        report = validator.finish()
        if not report.ok:
            raise InvalidFile(f"{filename}: {report.summary()}", param="file")
        check_upload(session, tenant, size)
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


def _spool_validated(source: BinaryIO, spool: BinaryIO, validator: JsonlValidator, max_bytes: int) -> int:
    """Copies `source` to `spool` chunk by chunk, validating the lines as they pass; stops at the size limit
    or once the validator has read all it will (the line limit). Returns the size."""
    size = 0
    while chunk := source.read(CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise FileTooLarge(f"the file is larger than the {max_bytes}-byte limit", param="file")
        spool.write(chunk)
        for _ in validator.feed(chunk):
            pass  # the report counts examples; uploads keep no records
        if validator.stopped:
            break
    return size


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
