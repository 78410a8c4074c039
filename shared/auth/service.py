"""API keys: created with their secret shown once, stored as a hash, checked on every request, each bound to
one tenant, some with the admin role. An expired key stops working at its expiry; a revoked one on the next
request, or within TUNEQUEUE_API_KEY_CACHE_SECONDS where another API process had verified it (`cache.py`)."""

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from shared.auth.cache import VerifiedKeys
from shared.auth.models import ApiKey
from shared.errors import InvalidRequest, NotFound, Unauthenticated
from shared.ids import new_id, now

KEY_PREFIX = "tq-"
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_EXPIRES_IN = 100 * 365 * 86400  # a key meant to live longer should simply not expire


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key, its tenant (every /v1 query is scoped to it) and whether it is an admin."""

    key_id: str
    tenant: str
    admin: bool


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_tenant_name(tenant: str) -> str:
    if not TENANT_NAME.fullmatch(tenant):  # `$` alone would let a trailing newline through
        raise InvalidRequest(
            f"Invalid tenant name {tenant!r}: 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit",
            param="tenant",
        )
    return tenant


def create_key(
    session: Session, tenant: str, *, admin: bool = False, name: str | None = None, expires_in: int | None = None
) -> tuple[ApiKey, str]:
    """Returns the stored key and its secret; the secret is not kept anywhere. `expires_in`: seconds from now
    after which the key is refused (None: it works until revoked)."""
    if expires_in is not None and not 0 < expires_in <= MAX_EXPIRES_IN:
        raise InvalidRequest(
            f"expires_in must be from 1 to {MAX_EXPIRES_IN} seconds (100 years), got {expires_in}; "
            "leave it out for a key that does not expire",
            param="expires_in",
        )
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    created = now()
    key = ApiKey(
        id=new_id("key"),
        tenant=check_tenant_name(tenant),
        name=name,
        admin=admin,
        prefix=secret[:10],
        secret_sha256=hash_secret(secret),
        created_at=created,
        expires_at=created + expires_in if expires_in is not None else None,
    )
    session.add(key)
    session.flush()
    return key, secret


VERIFIED: VerifiedKeys[Principal] = VerifiedKeys()


def recently_verified(secret: str, seconds: float) -> Principal | None:
    """The caller of a key verified within the last `seconds` by this process, if it has not expired since;
    None: read the key (`authenticate`)."""
    return VERIFIED.get(hash_secret(secret)) if seconds > 0 else None


def authenticate(session: Session, secret: str, remember_seconds: float = 0) -> Principal | None:
    """The caller of this secret; None for an unknown or revoked key. An expired key raises 401 saying so: its
    holder has nothing to fix but the key, and learns which. A working key is remembered for
    `remember_seconds` (`recently_verified`)."""
    # The lookup is by the hash of what was sent: no stored secret to compare, no timing to leak.
    digest = hash_secret(secret)
    key = session.scalars(select(ApiKey).where(ApiKey.secret_sha256 == digest)).first()
    if key is None or key.revoked_at is not None:
        return None
    if is_expired(key):
        raise Unauthenticated(
            f"API key {key.prefix}… expired at {utc(key.expires_at)} UTC; "
            "ask an admin for a new key (`tunequeue keys create --tenant NAME`)",
            code="api_key_expired",
        )
    principal = Principal(key_id=key.id, tenant=key.tenant, admin=key.admin)
    VERIFIED.put(digest, principal, key.id, key.expires_at, remember_seconds)
    return principal


def is_expired(key: ApiKey, at: int | None = None) -> bool:
    return key.expires_at is not None and key.expires_at <= (now() if at is None else at)


def utc(epoch: int | None) -> str:
    return datetime.fromtimestamp(epoch or 0, UTC).strftime("%Y-%m-%d %H:%M:%S")


def list_keys(session: Session, tenant: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if tenant is not None:
        query = query.where(ApiKey.tenant == tenant)
    return list(session.scalars(query))


def get_key(session: Session, key_id: str) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"No such API key: {key_id!r}", param="key_id", code="api_key_not_found")
    return key


def revoke_key(session: Session, key_id: str) -> ApiKey:
    key = get_key(session, key_id)
    if key.revoked_at is None:
        key.revoked_at = now()
        session.flush()
    VERIFIED.forget(key.id)  # this process refuses it from the next request; others within their cache TTL
    return key


def has_active_keys(session: Session) -> bool:
    """Whether any key works now: neither revoked nor expired."""
    timestamp = now()
    active = select(ApiKey.id).where(
        ApiKey.revoked_at.is_(None), or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > timestamp)
    )
    return session.scalars(active.limit(1)).first() is not None


def has_any_keys(session: Session) -> bool:
    """Whether a key was ever made here, revoked and expired ones included: a fresh install has none."""
    return session.scalars(select(ApiKey.id).limit(1)).first() is not None


def describe(key: ApiKey) -> dict:
    return {
        "id": key.id,
        "object": "api_key",
        "tenant": key.tenant,
        "name": key.name,
        "admin": key.admin,
        "prefix": key.prefix,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
        "expires_at": key.expires_at,
    }
