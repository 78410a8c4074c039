from sqlalchemy import JSON, BigInteger, String
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base


class BaseModelRecord(Base):
    """A base model imported into the model store; only these can be fine-tuned."""

    __tablename__ = "base_models"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    source: Mapped[str] = mapped_column(String(1024))
    storage_prefix: Mapped[str] = mapped_column(String(1024))
    architecture: Mapped[str] = mapped_column(String(128))
    parameters: Mapped[int] = mapped_column(BigInteger)
    files: Mapped[dict] = mapped_column(JSON, default=dict)  # name -> sha256
    linear_modules: Mapped[list] = mapped_column(JSON, default=list, server_default="[]")  # LoRA targets
    created_at: Mapped[int] = mapped_column(BigInteger)
