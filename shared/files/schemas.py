from typing import Literal

from pydantic import BaseModel

from shared.files.models import File


class FileObject(BaseModel):
    object: Literal["file"] = "file"
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    status_details: str | None = None
    expires_at: int | None = None
    validation: dict | None = None  # tunequeue's: detected format, examples, warnings with line numbers

    @classmethod
    def of(cls, file: File) -> "FileObject":
        return cls(
            id=file.id,
            bytes=file.bytes,
            created_at=file.created_at,
            filename=file.filename,
            purpose=file.purpose,
            status=file.status,
            validation=file.report,
        )


class FileDeleted(BaseModel):
    object: Literal["file"] = "file"
    id: str
    deleted: bool = True
