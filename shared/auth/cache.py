"""API keys verified recently, remembered for a few seconds by each API process, so that a client polling a
job does not cost a database round trip for its key on every request. Keyed by the secret's sha256, as the
table is: the secret itself is never held.

What stays exact: an expired key is refused at its expiry (the entry carries it and is checked on each use);
a key revoked through this process is forgotten at once. What takes up to the TTL: a revocation by another
process (another API process, `tunequeue keys revoke`) or an edit of the row by hand."""

import threading
import time
from dataclasses import dataclass
from typing import Generic, TypeVar

from shared.ids import now

P = TypeVar("P")
MAX_ENTRIES = 10_000  # only keys that verified are remembered: more than this many in a few seconds is unusual


@dataclass(frozen=True)
class _Entry(Generic[P]):
    principal: P
    key_id: str
    key_expires_at: int | None
    trusted_until: float  # time.monotonic()


class VerifiedKeys(Generic[P]):
    def __init__(self) -> None:
        self._entries: dict[str, _Entry[P]] = {}
        self._lock = threading.Lock()

    def get(self, digest: str) -> P | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        expired = entry.key_expires_at is not None and entry.key_expires_at <= now()
        if expired or time.monotonic() >= entry.trusted_until:
            self._drop(digest)
            return None  # read again: the database says whether it still works, and why not
        return entry.principal

    def put(self, digest: str, principal: P, key_id: str, key_expires_at: int | None, seconds: float) -> None:
        if seconds <= 0:
            return
        with self._lock:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[digest] = _Entry(principal, key_id, key_expires_at, time.monotonic() + seconds)

    def forget(self, key_id: str) -> None:
        with self._lock:
            for digest in [d for d, e in self._entries.items() if e.key_id == key_id]:
                del self._entries[digest]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _drop(self, digest: str) -> None:
        with self._lock:
            self._entries.pop(digest, None)
