"""Runs one claimed job, one role per module: `job` orchestrates; `inputs`, `resume` and `config` prepare the
attempt; `child` runs the recipe; `promotion` makes its checkpoints and adapter the job's (fenced); `journal`
records its events; `crash` and `errors` say how it ended. Torch-free: it runs in the Celery process."""

from worker.runner.child import free_port
from worker.runner.crash import cause, describe_crash, signal_name
from worker.runner.errors import RecipeFailed, RetryAttempt
from worker.runner.inputs import ResumeCandidate
from worker.runner.job import SHUTDOWN, JobRunner
from worker.runner.lease import LeaseKeeper
from worker.runner.promotion import metrics_csv, zip_folder
from worker.training.process import PAUSED_EXIT_CODE

__all__ = [
    "PAUSED_EXIT_CODE",
    "SHUTDOWN",
    "JobRunner",
    "LeaseKeeper",
    "RecipeFailed",
    "ResumeCandidate",
    "RetryAttempt",
    "cause",
    "describe_crash",
    "free_port",
    "metrics_csv",
    "signal_name",
    "zip_folder",
]
