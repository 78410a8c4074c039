"""Where an attempt's seconds go between its claim and its first step: each point it reached, logged in one
line (JSON after `startup `) when the recipe reports that step. Operators read it; `make bench-warm` too."""

import json
import logging
import time

log = logging.getLogger("tunequeue.worker")
MESSAGE_CHARS = 60


class StartupTimeline:
    def __init__(self, job_id: str, attempt: int):
        self.job_id, self.attempt = job_id, attempt
        self.claimed_at = time.time()
        self.marks: list[tuple[str, float]] = []
        self.warm: bool | None = None
        self.reported = False

    def mark(self, point: str) -> None:
        if not self.reported:
            self.marks.append((point, round(time.time() - self.claimed_at, 3)))

    def recipe_said(self, message: str) -> None:
        self.mark(f"message: {message[:MESSAGE_CHARS]}")

    def first_step(self, step: int) -> None:
        self.mark(f"step {step}")
        self.reported = True
        log.info("startup %s", json.dumps(self.summary()))

    def summary(self) -> dict:
        return {
            "job": self.job_id,
            "attempt": self.attempt,
            "warm": self.warm,
            "claimed_at": self.claimed_at,
            "marks": self.marks,
        }
