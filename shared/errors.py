"""Domain errors carry their HTTP status and OpenAI's error fields; one handler renders them."""


class TunequeueError(Exception):
    status_code = 400
    type = "invalid_request_error"
    code: str | None = None

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


class ServiceUnavailable(TunequeueError):
    status_code = 503
    type = "server_error"
    code = "service_unavailable"
