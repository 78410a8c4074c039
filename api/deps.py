from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Query
from sqlalchemy.orm import Session

from shared.auth.service import Principal, authenticate
from shared.db import session_scope
from shared.errors import PermissionDenied, Unauthenticated
from shared.settings import Settings, get_settings
from shared.storage import Storage, get_storage


def _session() -> Iterator[Session]:
    # The request owns the transaction: commit when the endpoint returns, roll back if it raises.
    with session_scope() as session:
        yield session


# scope="function": the transaction commits before the response is sent, so a client that polls right
# after a 200 sees what it created, and a failed commit becomes an error response.
DbSession = Annotated[Session, Depends(_session, scope="function")]


def principal(
    session: DbSession,
    authorization: Annotated[str | None, Header(description="`Bearer <API key>`")] = None,
) -> Principal:
    """Every /v1 and /admin request: the key is looked up on each request, so revoking it takes effect on the
    next one."""
    scheme, _, secret = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthenticated(
            "Missing API key: send `Authorization: Bearer <key>` "
            "(an admin creates keys with `tunequeue keys create --tenant NAME`)"
        )
    found = authenticate(session, secret.strip())
    if found is None:
        raise Unauthenticated("Incorrect or revoked API key")
    return found


def require_admin(caller: Annotated[Principal, Depends(principal)]) -> Principal:
    if not caller.admin:
        raise PermissionDenied("This route is for admin keys only (`tunequeue keys create --tenant T --admin`)")
    return caller


def _tenant(caller: Annotated[Principal, Depends(principal)]) -> str:
    return caller.tenant


Caller = Annotated[Principal, Depends(principal)]
Tenant = Annotated[str, Depends(_tenant)]
StorageDep = Annotated[Storage, Depends(get_storage)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
# A page's cursor is an id: printable, so that it can be compared with stored ids (Postgres text holds no NUL).
After = Annotated[
    str | None, Query(max_length=128, pattern=r"^[^\x00-\x1f\x7f]*$", description="the last id of the previous page")
]
