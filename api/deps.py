from collections.abc import AsyncIterator, Callable, Iterator
from functools import lru_cache
from hmac import compare_digest
from typing import Annotated, Concatenate, ParamSpec, TypeVar

from fastapi import Depends, Header, Query, Request
from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from shared.auth.service import Principal, authenticate, recently_verified
from shared.auth.sessions import SignedIn, signed_in
from shared.db import get_engine, get_sessionmaker, session_scope
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


async def _read_session() -> AsyncIterator[Session]:
    """For routes that only read. Autocommit spares each request the BEGIN and COMMIT round trips and reads
    what a transaction at Postgres' READ COMMITTED would: each statement sees the data committed before it.
    Async, because opening and closing a session does no I/O (the connection is taken by the first query, in
    the route's thread): no trips through the thread pool for the dependency itself."""
    session = get_sessionmaker()(bind=_autocommit(get_engine()))
    try:
        yield session
    finally:
        session.close()


@lru_cache(maxsize=4)
def _autocommit(engine: Engine) -> Engine:
    return engine.execution_options(isolation_level="AUTOCOMMIT")  # shares the engine's pool


ReadSession = Annotated[Session, Depends(_read_session)]

P = ParamSpec("P")
T = TypeVar("T")


async def read(query: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
    """For the hottest read routes: `query` runs in the thread pool on an autocommit connection (what a
    ReadSession reads), taken and given back in that thread, with no session around it. One trip through the
    thread pool per request, for the query and nothing else."""

    def run() -> T:
        with _autocommit(get_engine()).connect() as connection:
            return query(connection, *args, **kwargs)

    return await run_in_threadpool(run)


SESSION_COOKIE = "tq_session"  # the dashboard's sign-in (api/ui)
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


async def principal(
    request: Request,
    authorization: Annotated[str | None, Header(description="`Bearer <API key>`")] = None,
) -> Principal:
    """Every /v1 and /admin request. A key this process verified in the last TUNEQUEUE_API_KEY_CACHE_SECONDS
    is trusted again without a query (unless it has expired since); any other is read from the database, in
    the thread pool. Revoking a key through this process takes effect on the next request.

    Without an Authorization header, the dashboard's session cookie is the caller (its pages' scripts upload
    files, create jobs and follow event streams through this API); a request that changes anything must
    then also carry the session's CSRF token in X-CSRF-Token."""
    if authorization is None and (token := request.cookies.get(SESSION_COOKIE)):
        return await _session_principal(request, token)
    scheme, _, secret = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthenticated(
            "Missing API key: send `Authorization: Bearer <key>` "
            "(an admin creates keys with `tunequeue keys create --tenant NAME`)"
        )
    seconds = get_settings().resolved_api_key_cache_seconds
    found = recently_verified(secret.strip(), seconds) or await run_in_threadpool(_read_key, secret.strip(), seconds)
    if found is None:
        raise Unauthenticated("Incorrect or revoked API key")
    return found


async def _session_principal(request: Request, token: str) -> Principal:
    found = await run_in_threadpool(read_signed_in, token)
    if found is None:
        raise Unauthenticated("Your dashboard session has ended (signed out, or its key was revoked): sign in again")
    if request.method not in SAFE_METHODS and not compare_digest(
        request.headers.get(CSRF_HEADER, "").encode(), found.csrf_token.encode()
    ):
        raise PermissionDenied(f"A dashboard request that changes anything needs its {CSRF_HEADER} header")
    return found.principal


def read_signed_in(token: str | None) -> SignedIn | None:
    """Who holds this dashboard session cookie (the API's cookie callers and the pages both ask)."""
    with session_scope() as session:
        return signed_in(session, token)


def _read_key(secret: str, remember_seconds: float) -> Principal | None:
    with session_scope() as session:
        return authenticate(session, secret, remember_seconds)


async def require_admin(caller: Annotated[Principal, Depends(principal)]) -> Principal:
    if not caller.admin:
        raise PermissionDenied("This route is for admin keys only (`tunequeue keys create --tenant T --admin`)")
    return caller


async def _tenant(caller: Annotated[Principal, Depends(principal)]) -> str:
    return caller.tenant


Caller = Annotated[Principal, Depends(principal)]
Tenant = Annotated[str, Depends(_tenant)]
StorageDep = Annotated[Storage, Depends(get_storage)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
# A page's cursor is an id: printable, so that it can be compared with stored ids (Postgres text holds no NUL).
After = Annotated[
    str | None, Query(max_length=128, pattern=r"^[^\x00-\x1f\x7f]*$", description="the last id of the previous page")
]
