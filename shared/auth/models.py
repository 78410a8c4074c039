from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base


class ApiKey(Base):
    """An API key, stored only as the sha256 of the secret (the secret is random, 256 bits: a slow hash would
    add nothing). `prefix` is the secret's first characters, shown in listings so that people can tell keys
    apart without the key being recoverable."""

    __tablename__ = "api_keys"
    __table_args__ = (Index("ix_api_keys_tenant", "tenant"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    prefix: Mapped[str] = mapped_column(String(16))
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # None: never


class UiSession(Base):
    """A dashboard sign-in: the browser holds a random token in a cookie; only its sha256 is stored. Bound to
    the key that signed in: every page reads the key with the session, so a revoked or expired key ends the
    session on its next request. `csrf_token` is sent back with every form that changes state."""

    __tablename__ = "ui_sessions"
    __table_args__ = (Index("ix_ui_sessions_key", "key_id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the cookie's token
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger)
