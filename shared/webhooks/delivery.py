"""Where webhook attempts run: a fixed number of sender threads per process, and one timer thread that hands a
failed delivery back to them once its retry is due. A retry's wait holds no sender, so an endpoint that is down
cannot hold up the deliveries to the others, however many transitions happen at once.

The threads are daemons, unlike a concurrent.futures pool's (joined at interpreter exit): a process that is
exiting never waits on a slow receiver. What it leaves pending is sent again by the next worker to start
(`redispatch_pending`)."""

import heapq
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable

log = logging.getLogger("tunequeue.webhooks")

# One send: the delivery's status afterwards, and the seconds to wait before the next send if still "pending".
Attempt = Callable[[str], tuple[str, float]]


class DeliveryPool:
    def __init__(self, attempt: Attempt, senders: int):
        self._attempt = attempt
        self._ready: queue.SimpleQueue[str] = queue.SimpleQueue()
        # A heap of (time.monotonic() when due, order of scheduling, delivery id): deliveries due at the same
        # moment leave in the order they were scheduled (`redispatch_pending` interleaves tenants that way).
        self._due: list[tuple[float, int, str]] = []
        self._order = itertools.count()
        self._due_changed = threading.Condition()
        for n in range(senders):
            threading.Thread(target=self._send_ready, daemon=True, name=f"tunequeue-webhooks-{n}").start()
        threading.Thread(target=self._release_due, daemon=True, name="tunequeue-webhook-retries").start()

    def submit(self, delivery_id: str) -> None:
        self._ready.put(delivery_id)

    def submit_after(self, delivery_id: str, delay: float) -> None:
        """Sent by a sender once `delay` seconds have passed; at once when it is not positive."""
        if delay > 0:
            self._retry_after(delivery_id, delay)
        else:
            self.submit(delivery_id)

    def _send_ready(self) -> None:
        while True:
            delivery_id = self._ready.get()
            try:
                status, delay = self._attempt(delivery_id)
            except Exception:  # left pending: sent again when a worker next starts
                log.exception("webhook delivery %s", delivery_id)
                continue
            if status == "pending":
                self._retry_after(delivery_id, delay)

    def _retry_after(self, delivery_id: str, delay: float) -> None:
        with self._due_changed:
            heapq.heappush(self._due, (time.monotonic() + delay, next(self._order), delivery_id))
            self._due_changed.notify()

    def _release_due(self) -> None:
        while True:
            with self._due_changed:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._due_changed.wait(self._due[0][0] - time.monotonic() if self._due else None)
                _, _, delivery_id = heapq.heappop(self._due)
            self.submit(delivery_id)


_pool: tuple[int, DeliveryPool] | None = None
_pool_lock = threading.Lock()


def delivery_pool(attempt: Attempt, senders: int) -> DeliveryPool:
    """The process's pool, started on first use. Keyed by process id: a forked child inherits the parent's pool
    object but none of its threads."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), DeliveryPool(attempt, senders))
        return _pool[1]
