"""tunequeue's own: OpenAI configures webhooks in its console; here a tenant registers endpoints by API."""

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from api.deps import DbSession, Tenant
from shared.jobs.schemas import Page
from shared.webhooks import service

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


URL_NEVER = r"\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"


class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")  # tenant and the secret are the server's to set
    url: str = Field(
        min_length=8,
        max_length=2048,
        # Spaces and control characters spelled out: what `\s` covers differs between regex engines (the
        # server's and a client's JSON Schema validator), U+0085 for one.
        pattern=rf"^https?://[^{URL_NEVER}/?#]+[^{URL_NEVER}]*$",
        examples=["http://127.0.0.1:8080/hooks/tunequeue"],  # what a test could call: loopback only
    )


class EndpointObject(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    created_at: int
    enabled: bool


class CreatedEndpoint(EndpointObject):
    secret: str = Field(description="Shown once: verify deliveries' signatures with it")


def _endpoint(endpoint, secret: bool = False) -> dict:
    body = {
        "id": endpoint.id,
        "object": "webhook_endpoint",
        "url": endpoint.url,
        "created_at": endpoint.created_at,
        "enabled": endpoint.enabled,
    }
    if secret:
        body["secret"] = endpoint.secret  # shown once: verify deliveries with it
    return body


@router.post("", response_model=CreatedEndpoint)
def create_endpoint(session: DbSession, tenant: Tenant, request: EndpointCreate):
    return _endpoint(service.create_endpoint(session, tenant, request.url), secret=True)


@router.get("", response_model=Page)
def list_endpoints(session: DbSession, tenant: Tenant):
    return Page(data=[_endpoint(e) for e in service.list_endpoints(session, tenant)], has_more=False)


@router.delete("/{endpoint_id}")
def delete_endpoint(session: DbSession, tenant: Tenant, endpoint_id: str):
    service.delete_endpoint(session, tenant, endpoint_id)
    return {"id": endpoint_id, "object": "webhook_endpoint", "deleted": True}


@router.get("/{endpoint_id}/deliveries", response_model=Page)
def list_deliveries(session: DbSession, tenant: Tenant, endpoint_id: str):
    endpoint = service.get_endpoint(session, tenant, endpoint_id)
    data = [
        {
            "id": d.id,
            "object": "webhook_delivery",
            "type": d.type,
            "job_id": d.job_id,
            "status": d.status,
            "attempts": d.attempts,
            "last_status_code": d.last_status_code,
            "last_error": d.last_error,
            "created_at": d.created_at,
            "delivered_at": d.delivered_at,
            "history": d.history,
        }
        for d in service.list_deliveries(session, endpoint)
    ]
    return Page(data=data, has_more=False)
