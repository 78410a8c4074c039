from sqlalchemy import BigInteger, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base


class InferenceRequest(Base):
    """A completion request in flight: the rows of a tenant bound its concurrency over every API process. A row
    outlives a crashed API process only until `expires_at` (the request timeout, plus a margin)."""

    __tablename__ = "inference_requests"
    __table_args__ = (Index("ix_inference_requests_tenant", "tenant", "expires_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(256))
    started_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger)
