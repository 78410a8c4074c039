from fastapi import APIRouter

from api.deps import DbSession, StorageDep, Tenant
from shared.catalog import service
from shared.jobs.schemas import Page

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=Page)
def list_models(session: DbSession, tenant: Tenant):
    return Page(data=service.list_models(session, tenant), has_more=False)


@router.get("/{model_id:path}")
def retrieve_model(session: DbSession, tenant: Tenant, model_id: str):
    return service.get_model(session, tenant, model_id)


@router.delete("/{model_id:path}")
def delete_model(session: DbSession, storage: StorageDep, tenant: Tenant, model_id: str):
    return {"id": service.delete_model(session, storage, tenant, model_id), "object": "model", "deleted": True}
