"""A job's status: OpenAI's names plus `paused`. A `StrEnum`, so a member is its string: the column stays a
plain string and JSON carries the same values."""

from enum import StrEnum


class JobStatus(StrEnum):
    VALIDATING = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
