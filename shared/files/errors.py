from shared.errors import InvalidRequest, NotFound


class FileNotFound(NotFound):
    def __init__(self, file_id: str, param: str | None = None):
        super().__init__(f"No such file: {file_id!r}", param=param, code="file_not_found")


class InvalidFile(InvalidRequest):
    code = "invalid_file_format"


class FileTooLarge(InvalidRequest):
    status_code = 413
    code = "file_too_large"
