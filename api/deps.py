import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header
from sqlalchemy.orm import Session

from shared.db import session_scope
from shared.errors import Unauthenticated
from shared.settings import Settings, get_settings
from shared.storage import Storage, get_storage


def _session() -> Iterator[Session]:
    # The request owns the transaction: commit when the endpoint returns, roll back if it raises.
    with session_scope() as session:
        yield session


def require_api_key(authorization: Annotated[str | None, Header()] = None) -> None:
    """One shared key until per-tenant keys arrive (the security work); none set: open, as in `make demo`."""
    expected = get_settings().api_key
    if expected is None:
        return
    given = (authorization or "").removeprefix("Bearer ").strip()
    if not given or not hmac.compare_digest(given, expected):
        raise Unauthenticated("Incorrect or missing API key: send `Authorization: Bearer <key>`")


def _tenant() -> str:
    return "default"  # API keys and tenants arrive with the security work; one tenant until then


# scope="function": the transaction commits before the response is sent, so a client that polls right
# after a 200 sees what it created, and a failed commit becomes an error response.
DbSession = Annotated[Session, Depends(_session, scope="function")]
Tenant = Annotated[str, Depends(_tenant)]
StorageDep = Annotated[Storage, Depends(get_storage)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
