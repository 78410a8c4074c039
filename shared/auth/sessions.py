"""Dashboard sessions: a sign-in with an API key, remembered by a cookie. The cookie holds a random token; the
database holds its sha256, the key it is bound to and the CSRF token of its forms. Each page reads the session
and its key in one query (no cache), so revoking or expiring the key ends the session on the next request."""

import secrets
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from shared.auth.models import ApiKey, UiSession
from shared.auth.service import Principal, authenticate, hash_secret
from shared.errors import Unauthenticated
from shared.ids import now


@dataclass(frozen=True)
class SignedIn:
    principal: Principal
    csrf_token: str
    key_prefix: str
    key_name: str | None


def sign_in(session: Session, secret: str, hours: float) -> str:
    """A new session for this key's holder; returns the cookie's token. 401 for a key that does not work."""
    principal = authenticate(session, secret.strip())
    if principal is None:
        raise Unauthenticated("Incorrect or revoked API key")
    token = secrets.token_urlsafe(32)
    created = now()
    session.execute(delete(UiSession).where(UiSession.expires_at <= created))  # the expired ones, as we pass
    session.add(
        UiSession(
            id=hash_secret(token),
            key_id=principal.key_id,
            csrf_token=secrets.token_urlsafe(32),
            created_at=created,
            expires_at=created + int(hours * 3600),
        )
    )
    session.flush()
    return token


def signed_in(session: Session, token: str | None) -> SignedIn | None:
    """Who holds this cookie: None for no, an unknown or an expired session, or a revoked or expired key."""
    if not token:
        return None
    at = now()
    row = session.execute(
        select(UiSession.csrf_token, ApiKey.id, ApiKey.tenant, ApiKey.admin, ApiKey.prefix, ApiKey.name)
        .join(ApiKey, ApiKey.id == UiSession.key_id)
        .where(
            UiSession.id == hash_secret(token),
            UiSession.expires_at > at,
            ApiKey.revoked_at.is_(None),
            (ApiKey.expires_at.is_(None)) | (ApiKey.expires_at > at),
        )
    ).first()
    if row is None:
        return None
    csrf, key_id, tenant, admin, prefix, name = row
    return SignedIn(Principal(key_id=key_id, tenant=tenant, admin=admin), csrf, prefix, name)


def sign_out(session: Session, token: str | None) -> None:
    if token:
        session.execute(delete(UiSession).where(UiSession.id == hash_secret(token)))
