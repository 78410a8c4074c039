"""Object storage behind one small interface: a local folder (embedded mode) or S3 (boto3, any endpoint).
Keys are '/'-separated paths built by the server, never by the user."""

import io
import logging
import os
import re
import shutil
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import unquote, urlparse

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from shared.checksums import CHUNK, HashingReader, sha256_stream
from shared.settings import InvalidSettings, get_settings

T = TypeVar("T")
log = logging.getLogger("tunequeue.storage")


class StorageError(Exception):
    """`str()` is for logs (it may name the endpoint, the bucket, the full key); `public` is what a tenant may
    read: what was being done, the object named by its file name only."""

    def __init__(self, message: str, *, action: str | None = None):
        super().__init__(message)
        self.action = action

    @property
    def public(self) -> str:
        if not self.action:
            return "storage unavailable"
        return "storage unavailable while " + re.sub(r"\S*/(\S+)", r"\1", self.action)


class ObjectNotFound(StorageError):
    pass


class Storage(ABC):
    @abstractmethod
    def put_stream(self, key: str, stream: BinaryIO) -> tuple[int, str]:
        """Store a stream; returns (bytes, sha256)."""

    @abstractmethod
    def iter_chunks(self, key: str) -> Iterator[bytes]: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]: ...

    @abstractmethod
    def ping(self) -> None:
        """Raise if the storage cannot be reached."""

    def put_file(self, key: str, path: Path) -> tuple[int, str]:
        with open(path, "rb") as stream:
            return self.put_stream(key, stream)

    def put_bytes(self, key: str, data: bytes) -> tuple[int, str]:
        return self.put_stream(key, io.BytesIO(data))

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.iter_chunks(key))

    def download(self, key: str, path: Path) -> str:
        """Copy an object to a local file; returns its sha256."""
        path.parent.mkdir(parents=True, exist_ok=True)
        # unique per writer: two workers (or threads) fetching the same model into one cache must not share it
        partial = path.with_name(f"{path.name}.part-{os.getpid()}-{threading.get_ident()}")
        with open(partial, "wb") as out:
            sha256 = sha256_stream(_written(self.iter_chunks(key), out))
        partial.replace(path)
        return sha256

    def sha256_of(self, key: str) -> str:
        """The sha256 of the object as stored (read back, not taken from the writer's word)."""
        return sha256_stream(self.iter_chunks(key))


def _written(chunks: Iterator[bytes], out: BinaryIO) -> Iterator[bytes]:
    """Each chunk, once written to `out`: the file and its digest come from one pass."""
    for chunk in chunks:
        out.write(chunk)
        yield chunk


def _worth_retrying(exc: BaseException) -> bool:
    return isinstance(exc, Exception) and not isinstance(exc, ObjectNotFound)


def with_retries(action: Callable[[], T], what: str, tries: int = 5, base_delay: float = 0.5) -> T:
    """Run `action`, retrying with exponential backoff; the last failure is raised as a StorageError that
    says what was being done. A missing object is not retried."""

    def log_retry(retry_state: RetryCallState) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        log.warning("%s failed (try %d of %d): %s; retrying", what, retry_state.attempt_number, tries, exc)

    try:
        return Retrying(
            retry=retry_if_exception(_worth_retrying),
            wait=wait_exponential(multiplier=base_delay),
            stop=stop_after_attempt(tries),
            before_sleep=log_retry,
            reraise=True,
        )(action)
    except ObjectNotFound:
        raise
    except Exception as exc:
        raise StorageError(f"{what} failed after {tries} tries: {type(exc).__name__}: {exc}", action=what) from exc


def put_verified(storage: "Storage", key: str, data: bytes | BinaryIO, tries: int = 5) -> str:
    """Upload `data` (bytes, or a seekable stream) and read the stored object back: returns its sha256 only
    once the store holds exactly these bytes. Retried as a whole, so a failed, torn or lost write is simply
    written again."""

    def upload_and_check() -> str:
        if isinstance(data, bytes):
            _, expected = storage.put_bytes(key, data)
        else:
            data.seek(0)
            _, expected = storage.put_stream(key, data)
        try:
            stored = storage.sha256_of(key)
        except ObjectNotFound:  # acknowledged but not there: a lost write, so write it again
            raise StorageError(f"{key}: missing right after a successful upload") from None
        if stored != expected:
            raise StorageError(f"{key}: stored object has sha256 {stored}, expected {expected}")
        return stored

    return with_retries(upload_and_check, f"uploading {key}", tries)


def download_verified(storage: "Storage", key: str, path: Path, expected_sha256: str, tries: int = 5) -> None:
    """Download an object and refuse it unless its sha256 is the one recorded in the database."""

    def fetch() -> None:
        actual = storage.download(key, path)
        if actual != expected_sha256:
            path.unlink(missing_ok=True)
            raise ChecksumMismatch(f"{key}: sha256 {actual} does not match the recorded {expected_sha256}")

    try:
        with_retries(fetch, f"downloading {key}", tries)
    except StorageError as exc:
        if isinstance(exc.__cause__, ChecksumMismatch):
            raise exc.__cause__ from None
        raise


class ChecksumMismatch(StorageError):
    pass


class LocalStorage(Storage):
    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise StorageError(f"key escapes the storage root: {key!r}")
        return path

    def put_stream(self, key: str, stream: BinaryIO) -> tuple[int, str]:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        reader = HashingReader(stream)
        # unique per writer: two workers (or threads) fetching the same model into one cache must not share it
        partial = path.with_name(f"{path.name}.part-{os.getpid()}-{threading.get_ident()}")
        with open(partial, "wb") as out:
            shutil.copyfileobj(reader, out, CHUNK)  # type: ignore[misc]
        partial.replace(path)  # atomic: a reader never sees a half-written object
        return reader.size, reader.hexdigest()

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        with open(path, "rb") as stream:
            while chunk := stream.read(CHUNK):
                yield chunk

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list_keys(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.exists():
            return []
        root = self.root.resolve()
        return sorted(str(p.relative_to(root)) for p in base.rglob("*") if p.is_file() and not p.name.endswith(".part"))

    def ping(self) -> None:
        if not self.root.is_dir():
            raise StorageError(f"storage folder {self.root} is missing")


class S3Storage(Storage):
    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60),
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_stream(self, key: str, stream: BinaryIO) -> tuple[int, str]:
        reader = HashingReader(stream)
        self.client.upload_fileobj(reader, self.bucket, self._key(key))
        return reader.size, reader.hexdigest()

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
                raise ObjectNotFound(key) from exc
            raise
        yield from body.iter_chunks(CHUNK)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return False
            raise

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list_keys(self, prefix: str) -> list[str]:
        keys = []
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
            keys += [obj["Key"][strip:] for obj in page.get("Contents", [])]
        return sorted(keys)

    def ping(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)


def storage_from_url(url: str, endpoint_url: str | None = None) -> Storage:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStorage(local_path(url))
    if parsed.scheme == "s3":
        return S3Storage(parsed.netloc, parsed.path, endpoint_url=endpoint_url)
    raise ValueError(f"TUNEQUEUE_STORAGE_URL must start with file:// or s3://, got {url!r}")


def local_path(url: str) -> Path:
    """The folder of a file:// URL. Its host must be empty or localhost (file://host/path names another
    machine's file, which this process cannot write), and percent-escapes are decoded (file:///my%20data)."""
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise InvalidSettings(
            f"invalid settings: TUNEQUEUE_STORAGE_URL={url!r}: a file:// URL names a folder on this machine, "
            f"so its host must be empty or localhost, not {parsed.netloc!r}; write file:///absolute/path"
        )
    if not parsed.path:
        raise InvalidSettings(f"invalid settings: TUNEQUEUE_STORAGE_URL={url!r}: give a folder, e.g. file:///srv/tq")
    return Path(unquote(parsed.path))


@lru_cache
def get_storage() -> Storage:
    settings = get_settings()
    return storage_from_url(settings.resolved_storage_url, settings.s3_endpoint_url)
