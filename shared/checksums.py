"""sha256 of files, chunk streams and streams being read through: the one way objects are fingerprinted."""

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

CHUNK = 1024 * 1024


def sha256_stream(chunks: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def iter_file_chunks(stream: BinaryIO, size: int = CHUNK) -> Iterable[bytes]:
    while chunk := stream.read(size):
        yield chunk


def sha256_file(path: Path) -> str:
    with open(path, "rb") as stream:
        return sha256_stream(iter_file_chunks(stream))


class HashingReader:
    """Wraps a stream so that its size and sha256 are known once it has been read through."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self._digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._digest.update(data)
        self.size += len(data)
        return data

    def hexdigest(self) -> str:
        return self._digest.hexdigest()
