"""How an attempt ends when it does not succeed: requeued for another attempt, or the job failed."""

from worker.runner.crash import describe_crash


class RetryAttempt(Exception):
    """This attempt ended for a reason that is not the job's fault (its process was killed, storage or the
    database failed, the worker is shutting down): requeue the job for another attempt."""

    def __init__(self, reason: str, code: str = "worker_lost"):
        super().__init__(reason)
        self.code = code


class RecipeFailed(Exception):
    """The job's own failure (its data, config or code): the job fails with this code, message and param."""

    def __init__(self, error: dict | None, returncode: int, stderr_tail: list[str]):
        self.code = (error or {}).get("code") or ("worker_killed" if returncode < 0 else "training_error")
        message = (error or {}).get("message")
        if not message:
            message = f"the training process {describe_crash(returncode, stderr_tail)}"
        elif (error or {}).get("rank") is not None:
            message = f"{message} (rank {error['rank']})"  # type: ignore[index]
        self.param = (error or {}).get("param")
        super().__init__(message)


class TaskFailed(Exception):
    """Why an evaluation or an export could not be made, in words for the job's owner; `manifest` when its figures
    exist (an export outside its fidelity bounds)."""

    def __init__(self, reason: str, manifest: dict | None = None):
        super().__init__(reason)
        self.manifest = manifest


def failure_reason(exc: Exception) -> str:
    """What the owner reads when an evaluation or an export fails: its own reason, or the kind of trouble (a
    storage error's details, endpoint and bucket, are the admins', in the log)."""
    from shared.storage import StorageError

    if isinstance(exc, TaskFailed | RecipeFailed):
        return str(exc)
    if isinstance(exc, StorageError):
        return f"storage unavailable ({exc.public}); ask for it again later"
    return f"internal error on its worker ({type(exc).__name__}); ask for it again later"
