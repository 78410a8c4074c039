"""tunequeue's own: OpenAI configures webhooks in its console; here a tenant registers endpoints by API."""

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from api.deps import DbSession, ReadSession, Tenant
from api.errors import declare
from shared.pagination import Page
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
    model_config = ConfigDict(from_attributes=True)  # read from the WebhookEndpoint row
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    created_at: int
    enabled: bool = Field(description="False once disabled by its failures in a row; POST …/enable turns it on")
    consecutive_failures: int = Field(description="Failed attempts in a row; reset by a delivered one")
    disabled_at: int | None
    disabled_reason: str | None


class CreatedEndpoint(EndpointObject):
    secret: str = Field(description="Shown once: verify deliveries' signatures with it")


class DeliveryObject(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # read from the WebhookDelivery row
    id: str
    object: Literal["webhook_delivery"] = "webhook_delivery"
    type: str
    job_id: str
    status: str = Field(description="pending, delivered or failed")
    attempts: int
    last_status_code: int | None
    last_error: str | None
    created_at: int
    delivered_at: int | None
    history: list


@router.post("", response_model=CreatedEndpoint, responses=declare(429))
def create_endpoint(session: DbSession, tenant: Tenant, request: EndpointCreate):
    endpoint, secret = service.create_endpoint(session, tenant, request.url)
    shown = EndpointObject.model_validate(endpoint).model_dump()
    return CreatedEndpoint(**shown, secret=secret)  # shown once; the row holds it encrypted


@router.get("", response_model=Page[EndpointObject])
def list_endpoints(session: ReadSession, tenant: Tenant):
    endpoints = service.list_endpoints(session, tenant)
    return Page[EndpointObject].whole([EndpointObject.model_validate(e) for e in endpoints])


@router.get("/{endpoint_id}", response_model=EndpointObject)
def get_endpoint(session: ReadSession, tenant: Tenant, endpoint_id: str):
    return EndpointObject.model_validate(service.get_endpoint(session, tenant, endpoint_id))


@router.post("/{endpoint_id}/enable", response_model=EndpointObject)
def enable_endpoint(session: DbSession, tenant: Tenant, endpoint_id: str):
    """Turns an endpoint disabled by its failures back on, with its failure count at zero."""
    return EndpointObject.model_validate(service.enable_endpoint(session, tenant, endpoint_id))


@router.delete("/{endpoint_id}")
def delete_endpoint(session: DbSession, tenant: Tenant, endpoint_id: str):
    service.delete_endpoint(session, tenant, endpoint_id)
    return {"id": endpoint_id, "object": "webhook_endpoint", "deleted": True}


@router.get("/{endpoint_id}/deliveries", response_model=Page[DeliveryObject])
def list_deliveries(session: ReadSession, tenant: Tenant, endpoint_id: str):
    endpoint = service.get_endpoint(session, tenant, endpoint_id)
    deliveries = service.list_deliveries(session, endpoint)
    return Page[DeliveryObject].whole([DeliveryObject.model_validate(d) for d in deliveries])
