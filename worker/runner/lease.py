"""The attempt's lease on its job, renewed while the worker holds the job."""

import logging
import threading
from collections.abc import Callable

from sqlalchemy.orm import Session

from shared.db import session_scope
from shared.jobs import execution

log = logging.getLogger("tunequeue.worker")


class LeaseKeeper(threading.Thread):
    """Renews the attempt's lease while the worker holds the job, from the claim (so downloading a large base
    model counts too) to the end. `lost` is set once the attempt is no longer the job's."""

    def __init__(self, job_id: str, attempt: int, lease_seconds: float):
        super().__init__(daemon=True, name=f"lease-{job_id}")
        self.job_id, self.attempt, self.lease_seconds = job_id, attempt, lease_seconds
        self.stopped, self.lost = threading.Event(), threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.lease_seconds / 4):
            try:
                with session_scope() as session:
                    if not execution.renew_lease(session, self.job_id, self.attempt, self.lease_seconds):
                        self.lost.set()
                        return
            except Exception as exc:  # the database is away: keep training, keep trying
                log.warning("could not renew the lease of %s: %s", self.job_id, exc)

    def stop(self) -> None:
        self.stopped.set()


class ClaimRenewal:
    """Renews a claim other than an attempt's (a validation's, an evaluation's) from a thread, every third of
    its lease, while open. `renew` is one UPDATE in the session it is given."""

    def __init__(self, what: str, renew: Callable[[Session], object], lease_seconds: float):
        self.what, self.renew, self.lease_seconds = what, renew, lease_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"claim-{what}", daemon=True)

    def __enter__(self) -> "ClaimRenewal":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                with session_scope() as session:
                    self.renew(session)
            except Exception:  # the database is away for a moment: the next renewal tries again
                log.warning("could not renew the claim of %s", self.what, exc_info=True)
