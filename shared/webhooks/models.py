from sqlalchemy import JSON, BigInteger, Boolean, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base


class WebhookEndpoint(Base):
    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    secret: Mapped[str] = mapped_column(String(512))  # whsec_<base64>, shown once, stored encrypted
    created_at: Mapped[int] = mapped_column(BigInteger)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # The circuit breaker: failed attempts in a row; past the setting's limit, the endpoint is disabled.
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    disabled_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    disabled_reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class WebhookDelivery(Base):
    """One event for one endpoint. Written in the transaction of the job transition it reports (an outbox),
    sent after commit, retried with backoff; every attempt is recorded here."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_status", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_endpoint_created", "endpoint_id", "created_at", "id"),  # an endpoint's list
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # also the webhook-id header
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text)  # the exact body that is signed and sent
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending, delivered, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    next_attempt_at: Mapped[int] = mapped_column(BigInteger)
    delivered_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Unix milliseconds before which no process may send it: the lease of an attempt in flight, then the time
    # its retry is due. Taken by one UPDATE (`service.claim`), so two processes never send it at once.
    claimed_until_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    history: Mapped[list] = mapped_column(JSON, default=list)
