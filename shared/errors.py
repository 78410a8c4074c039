"""Domain errors carry their HTTP status and OpenAI's error fields; one handler renders them."""


class TunequeueError(Exception):
    status_code = 400
    type = "invalid_request_error"
    code: str | None = None
    headers: dict[str, str] = {}

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(TunequeueError):
    status_code = 400


class NotFound(TunequeueError):
    status_code = 404
    code = "not_found"


class Conflict(TunequeueError):
    status_code = 409
    code = "conflict"


class Unauthenticated(TunequeueError):
    status_code = 401
    code = "invalid_api_key"


class Unprocessable(TunequeueError):
    status_code = 422
    code = "unprocessable_entity"


class RateLimited(TunequeueError):
    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int, param: str | None = None):
        super().__init__(message, param=param)
        self.headers = {"Retry-After": str(retry_after)}


class PermissionDenied(TunequeueError):
    status_code = 403
    type = "permission_error"
    code = "permission_denied"
