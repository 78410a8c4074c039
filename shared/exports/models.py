from sqlalchemy import JSON, BigInteger, ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base


class Export(Base):
    """A succeeded job's model in another form (`shared.exports.service`): made by a worker, stored under the
    job's prefix (deleted with its model), counted in the tenant's storage."""

    __tablename__ = "exports"
    __table_args__ = (Index("ix_exports_job_created_id", "job_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    format: Mapped[str] = mapped_column(String(16))
    options: Mapped[dict] = mapped_column(JSON, default=dict)  # dtype and base_weights of a merged export
    status: Mapped[str] = mapped_column(String(16))  # queued, running, succeeded, failed
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    progress: Mapped[str | None] = mapped_column(Text, nullable=True)  # the running export's last step
    storage_key: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    manifest: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # what was made and its fidelity
    lease_expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # the running worker's claim
    created_at: Mapped[int] = mapped_column(BigInteger)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
