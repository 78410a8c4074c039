"""The attempt's lease on its job, renewed while the worker holds the job."""

import logging
import threading

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
