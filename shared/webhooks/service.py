"""Webhooks: every job transition is delivered to the tenant's endpoints as `fine_tuning.job.<status>`,
signed per Standard Webhooks (webhook-id, webhook-timestamp, webhook-signature: v1,<base64 HMAC-SHA256 of
"id.timestamp.body">) as OpenAI signs its own, retried with exponential backoff, every attempt recorded.
Attempts run on a fixed number of sender threads per process (`shared.webhooks.delivery`), through a sender
that only reaches permitted addresses (`shared.webhooks.sender`, `shared.webhooks.destination`).

An endpoint that keeps failing is backed off as a whole (its next attempt, whichever delivery it is for, waits
longer after each failure in a row) and disabled once its failures in a row reach
`TUNEQUEUE_WEBHOOK_DISABLE_AFTER_FAILURES`: its pending deliveries fail, no new ones are recorded, and the
tenant re-enables it when the receiver is fixed. Signing secrets are stored encrypted (`shared.secrets`)."""

import base64
import hashlib
import hmac
import json
import logging
import math
import random
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import TypeVar

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared import secrets as stored_secrets
from shared.db import after_commit, session_scope
from shared.errors import InvalidRequest, NotFound, RateLimited
from shared.ids import new_id, now
from shared.settings import get_settings
from shared.webhooks import sender
from shared.webhooks.delivery import DeliveryPool, delivery_pool
from shared.webhooks.destination import DestinationRefused, check_url
from shared.webhooks.models import WebhookDelivery, WebhookEndpoint

log = logging.getLogger("tunequeue.webhooks")
T = TypeVar("T")


def create_endpoint(session: Session, tenant: str, url: str) -> tuple[WebhookEndpoint, str]:
    """The new endpoint and its signing secret, in plain text this once (the row holds it encrypted)."""
    if not url.startswith(("http://", "https://")):
        raise InvalidRequest("url must start with http:// or https://", param="url")
    try:
        check_url(url)
    except DestinationRefused as exc:
        raise InvalidRequest(
            f"url is refused: {exc}. Webhooks reach public addresses only; an operator can allow a private "
            "network with TUNEQUEUE_WEBHOOK_ALLOWED_NETWORKS",
            param="url",
        ) from None
    _check_endpoint_count(session, tenant)
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    endpoint = WebhookEndpoint(
        id=new_id("wh"),
        tenant=tenant,
        url=url,
        created_at=now(),
        enabled=True,
        consecutive_failures=0,
        secret=stored_secrets.encrypt(secret),
    )
    session.add(endpoint)
    session.flush()
    return endpoint, secret


def _check_endpoint_count(session: Session, tenant: str) -> None:
    """A cap per tenant (429, like the other per-tenant counts): each endpoint multiplies every transition's
    deliveries."""
    limit = get_settings().webhook_max_endpoints_per_tenant
    count = session.scalar(select(func.count()).select_from(WebhookEndpoint).where(WebhookEndpoint.tenant == tenant))
    count = count or 0
    if count >= limit:
        raise RateLimited(
            f"tenant has {count} webhook endpoints, the most allowed (TUNEQUEUE_WEBHOOK_MAX_ENDPOINTS_PER_TENANT="
            f"{limit}); delete one it no longer needs",
            retry_after=60,
            param="url",
        )


def list_endpoints(session: Session, tenant: str) -> list[WebhookEndpoint]:
    return list(session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.tenant == tenant)))


def get_endpoint(session: Session, tenant: str, endpoint_id: str) -> WebhookEndpoint:
    endpoint = session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None or endpoint.tenant != tenant:
        raise NotFound(f"No such webhook endpoint: {endpoint_id!r}", code="webhook_not_found")
    return endpoint


def delete_endpoint(session: Session, tenant: str, endpoint_id: str) -> None:
    session.delete(get_endpoint(session, tenant, endpoint_id))
    session.flush()


def enable_endpoint(session: Session, tenant: str, endpoint_id: str) -> WebhookEndpoint:
    """Back on after the tenant fixed its receiver: the failure count starts again from zero. Deliveries failed
    while it was disabled stay failed; the next transition is delivered."""
    endpoint = get_endpoint(session, tenant, endpoint_id)
    endpoint.enabled, endpoint.consecutive_failures = True, 0
    endpoint.disabled_at = endpoint.disabled_reason = None
    session.flush()
    _backoff.clear(endpoint.id)
    return endpoint


def list_deliveries(session: Session, endpoint: WebhookEndpoint, limit: int = 100) -> list[WebhookDelivery]:
    query = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id)
    return list(
        session.scalars(query.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc()).limit(limit))
    )


def record_job_transition(session: Session, tenant: str, job_id: str, status: str) -> None:
    """Called inside the transition's transaction: one delivery row per enabled endpoint of the job's tenant,
    sent once committed."""
    endpoints = session.scalars(
        select(WebhookEndpoint).where(WebhookEndpoint.tenant == tenant, WebhookEndpoint.enabled.is_(True))
    ).all()
    if not endpoints:
        return
    created = now()
    event = {
        "id": new_id("evt"),
        "object": "event",
        "created_at": created,
        "type": f"fine_tuning.job.{status}",
        "data": {"id": job_id, "status": status},
    }
    ids = []
    for endpoint in endpoints:
        delivery = WebhookDelivery(
            id=new_id("msg"),
            endpoint_id=endpoint.id,
            job_id=job_id,
            type=event["type"],
            payload=json.dumps(event),
            status="pending",
            attempts=0,
            created_at=created,
            next_attempt_at=created,
            history=[],
        )
        session.add(delivery)
        ids.append(delivery.id)
    after_commit(session, lambda: dispatch(ids))


def _pool() -> DeliveryPool:
    return delivery_pool(attempt_delivery, get_settings().webhook_workers)


def dispatch(delivery_ids: list[str]) -> None:
    """Send in the background: the caller (an API request, a worker) does not wait on a slow receiver."""
    pool = _pool()
    for delivery_id in delivery_ids:
        pool.submit(delivery_id)


def retry_delay(failed_attempts: int, base: float) -> float:
    """Seconds to wait after the n-th failed attempt: base, 2×base, 4×base, … Each is stretched by up to a
    quarter at random, so endpoints that failed together are not all retried in the same instant; a quarter
    keeps every wait longer than the one before it."""
    return base * 2 ** (failed_attempts - 1) * random.uniform(1.0, 1.25)


class EndpointBackoff:
    """When each failing endpoint may next be tried, in this process: after its n-th failure in a row, the
    n-th retry delay (the exponent capped at the attempts a delivery gets). Deliveries to it that come up
    sooner wait for that moment without an attempt, so many pending deliveries do not hammer a receiver that
    is down, and hold no sender while they wait."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def wait_left(self, endpoint_id: str) -> float:
        with self._lock:
            return self._until.get(endpoint_id, 0.0) - time.monotonic()

    def failed(self, endpoint_id: str, failures_in_a_row: int) -> None:
        settings = get_settings()
        delay = retry_delay(min(failures_in_a_row, settings.webhook_max_attempts), settings.webhook_retry_base_seconds)
        with self._lock:
            self._until[endpoint_id] = time.monotonic() + delay

    def clear(self, endpoint_id: str) -> None:
        with self._lock:
            self._until.pop(endpoint_id, None)


_backoff = EndpointBackoff()


def attempt_delivery(delivery_id: str) -> tuple[str, float]:
    """One send: the delivery's status afterwards, and how long to wait before the next send if still pending."""
    with session_scope() as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        if delivery is None or delivery.status != "pending":
            return (delivery.status if delivery else "gone"), 0.0
        endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
        if endpoint is None:  # deleted since: nothing to send to
            return "gone", 0.0
        if not endpoint.enabled:
            delivery.status, delivery.last_error = "failed", _disabled_error(endpoint.disabled_reason)
            return "failed", 0.0
        wait = _backoff.wait_left(endpoint.id)
        if wait > 0:
            return "pending", wait
        endpoint_id, url, payload = endpoint.id, endpoint.url, delivery.payload
        secret = stored_secrets.decrypt(endpoint.secret)
    held = claim(delivery_id)
    if held is not None:  # another process is sending it, or holds its retry: look again when that ends
        return held
    timestamp = str(now())  # fresh per attempt; the webhook-id stays the same so receivers can deduplicate
    headers = {
        "content-type": "application/json",
        "webhook-id": delivery_id,
        "webhook-timestamp": timestamp,
        "webhook-signature": "v1," + sign(secret, delivery_id, timestamp, payload),
        "user-agent": "tunequeue-webhooks/1",
    }
    outcome = sender.post(url, payload.encode(), headers, get_settings().webhook_timeout_seconds)
    return _record_attempt(delivery_id, endpoint_id, outcome)


# How long past an attempt's own deadline its claim lasts: time to record the outcome. A process that dies
# mid-attempt holds the delivery this much longer before another may send it.
CLAIM_GRACE_SECONDS = 15.0


def claim(delivery_id: str) -> tuple[str, float] | None:
    """Takes the delivery for one attempt, or says why not. Several processes may hold the same delivery id
    (its sender, and every worker that starts while it is pending and re-dispatches it); one UPDATE decides
    which one sends, so a receiver gets one request per attempt. None: taken, send now. Otherwise the
    delivery's status, and when a pending one is worth looking at again: once the claim held elsewhere ends
    (the attempt in flight is over, or its retry falls due)."""
    clock_ms = int(time.time() * 1000)
    lease_ms = int((get_settings().webhook_timeout_seconds + CLAIM_GRACE_SECONDS) * 1000)
    free = WebhookDelivery.claimed_until_ms.is_(None) | (WebhookDelivery.claimed_until_ms <= clock_ms)
    with session_scope() as session:
        taken = session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending", free)
            .values(claimed_until_ms=clock_ms + lease_ms)
            .execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
        if taken:
            return None
        row = session.execute(
            select(WebhookDelivery.status, WebhookDelivery.claimed_until_ms).where(WebhookDelivery.id == delivery_id)
        ).first()
    if row is None:
        return "gone", 0.0
    status, until_ms = row
    if status != "pending":
        return status, 0.0
    return "pending", max((until_ms or clock_ms) - clock_ms, 50) / 1000


def _record_attempt(delivery_id: str, endpoint_id: str, outcome: sender.Outcome) -> tuple[str, float]:
    settings = get_settings()
    with session_scope() as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        if delivery is None:
            return "gone", 0.0
        delivery.attempts += 1
        delivery.last_status_code, delivery.last_error = outcome.status_code, outcome.error
        entry = {"at": now(), "status_code": outcome.status_code, "error": outcome.error}
        delivery.history = [*delivery.history, entry]
        if outcome.delivered:
            delivery.status, delivery.delivered_at = "delivered", now()
            _endpoint_succeeded(session, endpoint_id)
            return "delivered", 0.0
        failures = _endpoint_failed(session, endpoint_id)
        if failures >= settings.webhook_disable_after_failures:
            delivery.status = "failed"
            session.flush()
            _disable(session, endpoint_id, failures, outcome.error or "")
            return "failed", 0.0
        if delivery.attempts >= settings.webhook_max_attempts:
            delivery.status = "failed"
            return "failed", 0.0
        delay = retry_delay(delivery.attempts, settings.webhook_retry_base_seconds)
        clock = time.time()
        delivery.next_attempt_at = math.ceil(clock + delay)  # whole seconds, like every timestamp
        delivery.claimed_until_ms = int((clock + delay) * 1000)  # no process sends it before then
        _backoff.failed(endpoint_id, failures)
        return "pending", delay


def _endpoint_succeeded(session: Session, endpoint_id: str) -> None:
    _backoff.clear(endpoint_id)
    session.execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.enabled.is_(True))
        .values(consecutive_failures=0)
    )


def _endpoint_failed(session: Session, endpoint_id: str) -> int:
    """The endpoint's failures in a row, this one counted: one UPDATE, so senders failing at once all count."""
    counted = session.execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint_id)
        .values(consecutive_failures=WebhookEndpoint.consecutive_failures + 1)
        .returning(WebhookEndpoint.consecutive_failures)
    ).scalar_one_or_none()
    return counted or 0


def _disable(session: Session, endpoint_id: str, failures: int, last_error: str) -> None:
    """The circuit breaker opens: the endpoint is off until its tenant enables it, and what was still pending
    for it fails now rather than after every remaining retry."""
    reason = (
        f"{failures} failed attempts in a row (the last: {last_error}); fix the receiver, then enable the "
        f"endpoint with POST /v1/webhooks/{endpoint_id}/enable"
    )
    disabled = session.execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.enabled.is_(True))
        .values(enabled=False, disabled_at=now(), disabled_reason=reason)
        .returning(WebhookEndpoint.id)
    ).scalar_one_or_none()
    if disabled is None:  # another sender got there first
        return
    log.warning("webhook endpoint %s disabled: %s", endpoint_id, reason)
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint_id, WebhookDelivery.status == "pending")
        .values(status="failed", last_error=_disabled_error(reason))
        .execution_options(synchronize_session=False)
    )
    _backoff.clear(endpoint_id)


def _disabled_error(reason: str | None) -> str:
    return f"not sent: the endpoint was disabled after {reason}" if reason else "not sent: the endpoint is disabled"


def sign(secret: str, message_id: str, timestamp: str, body: str) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def redispatch_pending(pool: DeliveryPool | None = None) -> int:
    """At worker start: deliveries left pending by a process that died are handed to the sender pool, each
    when its next attempt is due, tenants taking turns (round robin, oldest first within each) so that one
    tenant's backlog does not hold up everyone else's."""
    with session_scope() as session:
        rows = session.execute(
            select(WebhookDelivery.id, WebhookEndpoint.tenant, WebhookDelivery.next_attempt_at)
            .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
            .where(WebhookDelivery.status == "pending", WebhookEndpoint.enabled.is_(True))
            .order_by(WebhookDelivery.created_at, WebhookDelivery.id)
        ).all()
    pool = pool or _pool()
    clock = time.time()
    for delivery_id, next_attempt_at in interleave_tenants((tenant, (id_, at)) for id_, tenant, at in rows):
        pool.submit_after(delivery_id, next_attempt_at - clock)
    return len(rows)


def interleave_tenants(items: Iterable[tuple[str, T]]) -> list[T]:
    """Round robin across tenants, each tenant's items in their given order; tenants in order of first item."""
    queues: dict[str, deque[T]] = {}
    for tenant, item in items:
        queues.setdefault(tenant, deque()).append(item)
    interleaved = []
    while queues:
        for tenant, queue in list(queues.items()):
            interleaved.append(queue.popleft())
            if not queue:
                del queues[tenant]
    return interleaved


def reencrypt_secrets(session: Session) -> int:
    """Every endpoint's secret written again with the first key (legacy plaintext ones included): the step
    of a key rotation after which the old key can be dropped. Returns how many were rewritten."""
    endpoints = session.scalars(select(WebhookEndpoint).order_by(WebhookEndpoint.id)).all()
    for endpoint in endpoints:
        endpoint.secret = stored_secrets.reencrypt(endpoint.secret)
    session.flush()
    return len(endpoints)
