from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel

from api.deps import DbSession, ReadSession, StorageDep, Tenant
from shared.catalog import service
from shared.pagination import Page

router = APIRouter(prefix="/v1/models", tags=["models"])


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


@router.get("", response_model=Page[ModelObject])
def list_models(session: ReadSession, tenant: Tenant):
    return Page[ModelObject].whole([ModelObject(**m) for m in service.list_models(session, tenant)])


@router.get("/{model_id:path}")
def retrieve_model(session: ReadSession, tenant: Tenant, model_id: str):
    return service.get_model(session, tenant, model_id)


@router.delete("/{model_id:path}")
def delete_model(session: DbSession, storage: StorageDep, tenant: Tenant, model_id: str):
    return {"id": service.delete_model(session, storage, tenant, model_id), "object": "model", "deleted": True}
