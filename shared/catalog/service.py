"""The models a tenant sees under /v1/models: the imported base models and its fine-tuned ones (a fine-tuned
model is the adapter of a succeeded job). Deleting a fine-tuned model deletes its adapter."""

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.basemodels.models import BaseModelRecord
from shared.basemodels.service import list_base_models
from shared.errors import InvalidRequest, NotFound
from shared.ids import now
from shared.jobs import state
from shared.jobs.models import Job
from shared.storage import Storage


class ModelNotFound(NotFound):
    def __init__(self, model_id: str):
        super().__init__(f"The model {model_id!r} does not exist", param="model", code="model_not_found")


def _tuned(session: Session, tenant: str):
    return select(Job).where(
        Job.tenant == tenant,
        Job.status == state.SUCCEEDED,
        Job.fine_tuned_model.is_not(None),
        Job.model_deleted_at.is_(None),
    )


def list_models(session: Session, tenant: str) -> list[dict]:
    models = [_base(m) for m in list_base_models(session)]
    models += [_fine_tuned(j) for j in session.scalars(_tuned(session, tenant).order_by(Job.finished_at))]
    return models


def get_model(session: Session, tenant: str, model_id: str) -> dict:
    base = session.get(BaseModelRecord, model_id)
    if base is not None:
        return _base(base)
    return _fine_tuned(_tuned_job(session, tenant, model_id))


def delete_model(session: Session, storage: Storage, tenant: str, model_id: str) -> str:
    if session.get(BaseModelRecord, model_id) is not None:
        raise InvalidRequest(f"{model_id} is a base model; only fine-tuned models can be deleted", param="model")
    job = _tuned_job(session, tenant, model_id)
    job.model_deleted_at = now()
    session.flush()
    if job.adapter_key:
        storage.delete(job.adapter_key)
    return model_id


def _tuned_job(session: Session, tenant: str, model_id: str) -> Job:
    job = session.scalars(_tuned(session, tenant).where(Job.fine_tuned_model == model_id)).first()
    if job is None:
        raise ModelNotFound(model_id)
    return job


def _base(record: BaseModelRecord) -> dict:
    return {"id": record.id, "object": "model", "created": record.created_at, "owned_by": "tunequeue"}


def _fine_tuned(job: Job) -> dict:
    return {
        "id": job.fine_tuned_model,
        "object": "model",
        "created": job.finished_at or job.created_at,
        "owned_by": job.tenant,
    }
