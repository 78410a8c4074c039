"""The attempt's entries in the job's event log, fenced by `attempt` like every write of a worker."""

from shared.db import retrying
from shared.jobs import execution


class AttemptJournal:
    def __init__(self, job_id: str, attempt: int):
        self.job_id, self.attempt = job_id, attempt

    def event(self, message: str, level: str = "info") -> None:
        retrying(
            lambda session: execution.add_event(session, self.job_id, self.attempt, message, level=level),
            f"recording an event of {self.job_id}",
        )

    def failure(self, step: int, error: str, frames: str | None) -> None:
        """What failed, where, and the traceback's last frames; its data lets the next attempt tell a repeated
        failure. The whole output is the attempt's log."""
        message = f"Attempt {self.attempt} failed at step {step}: {error}"
        if frames:
            message += "\n" + frames.rstrip()
        data = {
            "failure": {"step": step, "error": error},
            "log": f"/v1/fine_tuning/jobs/{self.job_id}/attempts/{self.attempt}/log",
        }
        retrying(
            lambda session: execution.add_event(session, self.job_id, self.attempt, message, level="error", data=data),
            f"recording the failure of {self.job_id}",
        )
