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
        # (generation, delivery id): `forget` moves to a new generation, and senders skip the older ones.
        self._ready: queue.SimpleQueue[tuple[int, str]] = queue.SimpleQueue()
        # A heap of (time.monotonic() when due, order of scheduling, delivery id): deliveries due at the same
        # moment leave in the order they were scheduled (`redispatch_pending` interleaves tenants that way).
        self._due: list[tuple[float, int, str]] = []
        self._order = itertools.count()
        self._generation = 0
        self._sending = 0  # attempts under way
        self._changed = threading.Condition()
        self._pid = os.getpid()  # a forked child inherits the object but none of its threads
        with _started_lock:
            _started.append(self)
        for n in range(senders):
            threading.Thread(target=self._send_ready, daemon=True, name=f"tunequeue-webhooks-{n}").start()
        threading.Thread(target=self._release_due, daemon=True, name="tunequeue-webhook-retries").start()

    def submit(self, delivery_id: str) -> None:
        with self._changed:
            self._ready.put((self._generation, delivery_id))

    def submit_after(self, delivery_id: str, delay: float) -> None:
        """Sent by a sender once `delay` seconds have passed; at once when it is not positive."""
        if delay > 0:
            with self._changed:
                self._schedule(delivery_id, delay)
        else:
            self.submit(delivery_id)

    def forget(self, wait: float) -> bool:
        """Drop every delivery queued or waiting for its retry, and wait up to `wait` seconds for the attempts
        under way to end; True when none is left under way. A dropped delivery stays pending in the database,
        where the next worker to start finds it (`redispatch_pending`)."""
        with self._changed:
            self._generation += 1
            self._due.clear()
            self._changed.notify_all()
            return self._changed.wait_for(lambda: self._sending == 0, wait)

    def _send_ready(self) -> None:
        while True:
            generation, delivery_id = self._ready.get()
            with self._changed:
                if generation != self._generation:
                    continue  # forgotten
                self._sending += 1
            try:
                status, delay = self._attempt(delivery_id)
            except Exception:  # left pending: sent again when a worker next starts
                log.exception("webhook delivery %s", delivery_id)
                status, delay = "", 0.0
            with self._changed:
                self._sending -= 1
                if status == "pending" and generation == self._generation:
                    self._schedule(delivery_id, delay)
                self._changed.notify_all()

    def _schedule(self, delivery_id: str, delay: float) -> None:
        """Due in `delay` seconds; the caller holds `_changed`."""
        heapq.heappush(self._due, (time.monotonic() + delay, next(self._order), delivery_id))
        self._changed.notify_all()

    def _release_due(self) -> None:
        while True:
            with self._changed:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._changed.wait(self._due[0][0] - time.monotonic() if self._due else None)
                _, _, delivery_id = heapq.heappop(self._due)
                self._ready.put((self._generation, delivery_id))


_pool: tuple[int, DeliveryPool] | None = None
_pool_lock = threading.Lock()
_started: list[DeliveryPool] = []  # their threads never end: each pool lives as long as its process
_started_lock = threading.Lock()


def delivery_pool(attempt: Attempt, senders: int) -> DeliveryPool:
    """The process's pool, started on first use. Keyed by process id: a forked child inherits the parent's pool
    object but none of its threads."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), DeliveryPool(attempt, senders))
        return _pool[1]


def forget_pending(wait: float) -> bool:
    """`DeliveryPool.forget` on every pool this process started (its own, and any made directly): True when
    none has an attempt left under way after `wait` seconds in all."""
    with _started_lock:
        pools = [pool for pool in _started if pool._pid == os.getpid()]
    deadline = time.monotonic() + wait
    return all([pool.forget(max(deadline - time.monotonic(), 0.0)) for pool in pools])
