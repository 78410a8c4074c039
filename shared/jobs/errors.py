from shared.errors import Conflict, NotFound


class JobNotFound(NotFound):
    def __init__(self, job_id: str, param: str | None = None):
        super().__init__(f"No such fine-tuning job: {job_id!r}", param=param, code="job_not_found")


class JobNotCancellable(Conflict):
    def __init__(self, job_id: str, status: str):
        super().__init__(f"Job {job_id} is already {status} and cannot be cancelled", code="job_not_cancellable")


class AdapterNotReady(Conflict):
    def __init__(self, job_id: str, status: str):
        super().__init__(
            f"Job {job_id} is {status}; its adapter can be downloaded once it has succeeded", code="adapter_not_ready"
        )


class JobConflict(Conflict):
    def __init__(self, message: str, code: str):
        super().__init__(message, code=code)


class EvaluationNotReady(Conflict):
    def __init__(self, job_id: str, status: str):
        super().__init__(
            f"Job {job_id} is {status}; a job is evaluated against its base model when it succeeds",
            code="evaluation_not_ready",
        )


class EvaluationNotFound(NotFound):
    def __init__(self, message: str, code: str):
        super().__init__(message, param="job_id", code=code)
