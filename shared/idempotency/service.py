"""Idempotency keys (`Idempotency-Key` header) on creating POSTs. The key row is inserted in the same
transaction as what the request creates: a concurrent request with the same key blocks on the insert until the
first commits, then replays its response. Same key, different request: 409. Keys live 24 hours per tenant."""

import hashlib
import json
from collections.abc import Callable

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.errors import Conflict, InvalidRequest
from shared.idempotency.models import IdempotencyKey
from shared.ids import now

KEEP_SECONDS = 24 * 3600


def request_fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def idempotent(
    session: Session, tenant: str, key: str | None, scope: str, fingerprint: str, produce: Callable[[], dict]
) -> dict:
    """The response of `produce()`, or the stored response of an earlier request with the same key."""
    if key is None:
        return produce()
    if not 1 <= len(key) <= 255:
        raise InvalidRequest("Idempotency-Key must be 1 to 255 characters", param="Idempotency-Key")
    session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < now() - KEEP_SECONDS))
    stored = _replay(session, tenant, key, scope, fingerprint)
    if stored is not None:
        return stored
    try:
        with session.begin_nested():
            session.add(
                IdempotencyKey(tenant=tenant, key=key, scope=scope, request_sha256=fingerprint, created_at=now())
            )
    except IntegrityError:
        # Another request with this key committed first (we waited on its row): answer as it did.
        stored = _replay(session, tenant, key, scope, fingerprint)
        if stored is None:
            raise Conflict(
                "A request with this Idempotency-Key is still in progress; retry shortly", code="idempotency_key_in_use"
            ) from None
        return stored
    response = produce()
    record = session.get(IdempotencyKey, (tenant, key))
    assert record is not None
    record.status_code, record.response = 200, response
    session.flush()
    return response


def _replay(session: Session, tenant: str, key: str, scope: str, fingerprint: str) -> dict | None:
    record = session.scalars(
        select(IdempotencyKey)
        .where(IdempotencyKey.tenant == tenant, IdempotencyKey.key == key)
        .execution_options(populate_existing=True)
    ).first()
    if record is None:
        return None
    if record.scope != scope or record.request_sha256 != fingerprint:
        raise Conflict(
            f"Idempotency-Key {key!r} was already used with a different request ({record.scope}); use a new key",
            code="idempotency_key_reused",
        )
    return record.response
