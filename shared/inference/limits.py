"""Each tenant's completion requests in flight, bounded over every API process (429 with Retry-After)."""

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from shared.errors import RateLimited
from shared.ids import new_id, now
from shared.inference.models import InferenceRequest

EXPIRY_MARGIN_SECONDS = 60


def admit(session: Session, tenant: str, model: str, *, limit: int, timeout_seconds: float) -> str:
    """Record a request of `tenant`, or refuse it if the tenant already has `limit` in flight. Commits: the
    row must be visible to the other API processes while the request runs."""
    started = now()
    row = InferenceRequest(
        id=new_id("infreq"),
        tenant=tenant,
        model=model,
        started_at=started,
        expires_at=started + int(timeout_seconds) + EXPIRY_MARGIN_SECONDS,
    )
    session.add(row)
    # rows left by an API process that died mid-request: they count no more, and go with the next admission
    session.execute(
        delete(InferenceRequest).where(InferenceRequest.tenant == tenant, InferenceRequest.expires_at <= started)
    )
    session.commit()
    # Counted after our own row is committed: two requests racing for the last place may both see the other
    # and both be refused, but never both admitted.
    in_flight = session.scalar(
        select(func.count()).where(InferenceRequest.tenant == tenant, InferenceRequest.expires_at > started)
    )
    if (in_flight or 0) > limit:
        session.execute(delete(InferenceRequest).where(InferenceRequest.id == row.id))
        session.commit()
        raise RateLimited(
            f"Too many completion requests in flight for this tenant ({limit} at once, "
            "TUNEQUEUE_INFERENCE_CONCURRENCY_PER_TENANT): retry when one has finished",
            retry_after=1,
        )
    return row.id


def release(session: Session, request_id: str) -> None:
    session.execute(delete(InferenceRequest).where(InferenceRequest.id == request_id))
