"""Webhooks: every job transition is delivered to the tenant's endpoints as `fine_tuning.job.<status>`,
signed per Standard Webhooks (webhook-id, webhook-timestamp, webhook-signature: v1,<base64 HMAC-SHA256 of
"id.timestamp.body">) as OpenAI signs its own, retried with exponential backoff, every attempt recorded.
Attempts run on a fixed number of sender threads per process (`shared.webhooks.delivery`)."""

import base64
import hashlib
import hmac
import json
import logging
import math
import random
import secrets
import time

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db import after_commit, session_scope
from shared.errors import InvalidRequest, NotFound
from shared.ids import new_id, now
from shared.settings import get_settings
from shared.webhooks.delivery import delivery_pool
from shared.webhooks.models import WebhookDelivery, WebhookEndpoint

log = logging.getLogger("tunequeue.webhooks")
MAX_ATTEMPTS = 8


def create_endpoint(session: Session, tenant: str, url: str) -> WebhookEndpoint:
    if not url.startswith(("http://", "https://")):
        raise InvalidRequest("url must start with http:// or https://", param="url")
    endpoint = WebhookEndpoint(
        id=new_id("wh"),
        tenant=tenant,
        url=url,
        created_at=now(),
        enabled=True,
        secret="whsec_" + base64.b64encode(secrets.token_bytes(32)).decode(),
    )
    session.add(endpoint)
    session.flush()
    return endpoint


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


def list_deliveries(session: Session, endpoint: WebhookEndpoint, limit: int = 100) -> list[WebhookDelivery]:
    query = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id)
    return list(
        session.scalars(query.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc()).limit(limit))
    )


def record_job_transition(session: Session, tenant: str, job_id: str, status: str) -> None:
    """Called inside the transition's transaction: one delivery row per endpoint, sent once committed."""
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


def dispatch(delivery_ids: list[str]) -> None:
    """Send in the background: the caller (an API request, a worker) does not wait on a slow receiver."""
    pool = delivery_pool(attempt_delivery, get_settings().webhook_workers)
    for delivery_id in delivery_ids:
        pool.submit(delivery_id)


def retry_delay(failed_attempts: int, base: float) -> float:
    """Seconds to wait after the n-th failed attempt: base, 2×base, 4×base, … Each is stretched by up to a
    quarter at random, so endpoints that failed together are not all retried in the same instant; a quarter
    keeps every wait longer than the one before it."""
    return base * 2 ** (failed_attempts - 1) * random.uniform(1.0, 1.25)


def attempt_delivery(delivery_id: str) -> tuple[str, float]:
    """One send: the delivery's status afterwards, and how long to wait before the next send if still pending."""
    with session_scope() as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        if delivery is None or delivery.status != "pending":
            return (delivery.status if delivery else "gone"), 0.0
        endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
        if endpoint is None:  # deleted since: nothing to send to
            return "gone", 0.0
        url, secret, payload = endpoint.url, endpoint.secret, delivery.payload
    timestamp = str(now())  # fresh per attempt; the webhook-id stays the same so receivers can deduplicate
    headers = {
        "content-type": "application/json",
        "webhook-id": delivery_id,
        "webhook-timestamp": timestamp,
        "webhook-signature": "v1," + sign(secret, delivery_id, timestamp, payload),
        "user-agent": "tunequeue-webhooks/1",
    }
    code, error = None, None
    try:
        code = httpx.post(url, content=payload, headers=headers, timeout=10).status_code
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    return _record_attempt(delivery_id, code, error)


def _record_attempt(delivery_id: str, code: int | None, error: str | None) -> tuple[str, float]:
    delay = 0.0
    with session_scope() as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        if delivery is None:
            return "gone", delay
        delivery.attempts += 1
        delivery.last_status_code, delivery.last_error = code, error
        delivery.history = [*delivery.history, {"at": now(), "status_code": code, "error": error}]
        if code is not None and 200 <= code < 300:
            delivery.status, delivery.delivered_at = "delivered", now()
        elif delivery.attempts >= MAX_ATTEMPTS:
            delivery.status = "failed"
        else:
            delay = retry_delay(delivery.attempts, get_settings().webhook_retry_base_seconds)
            delivery.next_attempt_at = math.ceil(time.time() + delay)  # whole seconds, like every timestamp
        return delivery.status, delay


def sign(secret: str, message_id: str, timestamp: str, body: str) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def redispatch_pending() -> int:
    """At worker start: deliveries left pending by a process that died are sent again."""
    with session_scope() as session:
        ids = list(session.scalars(select(WebhookDelivery.id).where(WebhookDelivery.status == "pending")))
    if ids:
        dispatch(ids)
    return len(ids)
