from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel
from sqlalchemy import select

from api.deps import DbSession, Tenant
from shared.basemodels.service import list_base_models
from shared.jobs import state
from shared.jobs.models import Job
from shared.jobs.schemas import Page

router = APIRouter(prefix="/v1/models", tags=["models"])


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


@router.get("", response_model=Page)
def list_models(session: DbSession, tenant: Tenant):
    data = [ModelObject(id=m.id, created=m.created_at, owned_by="tunequeue") for m in list_base_models(session)]
    tuned = session.scalars(
        select(Job).where(Job.tenant == tenant, Job.status == state.SUCCEEDED).order_by(Job.finished_at)
    )
    data += [
        ModelObject(id=j.fine_tuned_model, created=j.finished_at or j.created_at, owned_by=tenant)
        for j in tuned
        if j.fine_tuned_model
    ]
    return Page(data=data, has_more=False)
