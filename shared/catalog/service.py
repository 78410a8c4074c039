"""The models a tenant sees under /v1/models: the imported base models and its fine-tuned ones (a fine-tuned
model is the adapter of a succeeded job). Deleting a fine-tuned model deletes every object its job stored: the
adapter, and the checkpoints, saved states and attempt logs that hold the same weights or describe them.

The job's result files (purpose `fine-tune-results`: its metrics as CSV, its evaluation as JSON) stay: they are
the tenant's Files, listed and deleted under /v1/files like any other, and they hold no weights."""

from sqlalchemy import ColumnElement, Row, and_, delete, select, tuple_
from sqlalchemy.orm import Session

from shared.basemodels.models import BaseModelRecord
from shared.basemodels.service import list_base_models
from shared.errors import InvalidRequest, NotFound
from shared.exports.models import Export
from shared.ids import now
from shared.jobs import state
from shared.jobs.models import Checkpoint, Job
from shared.storage import Storage


class ModelNotFound(NotFound):
    def __init__(self, model_id: str):
        super().__init__(f"The model {model_id!r} does not exist", param="model", code="model_not_found")


def _is_tuned_model_of(tenant: str) -> ColumnElement[bool]:
    return and_(
        Job.tenant == tenant,
        Job.status == state.SUCCEEDED,
        Job.fine_tuned_model.is_not(None),
        Job.model_deleted_at.is_(None),
    )


def _tuned(session: Session, tenant: str):
    return select(Job).where(_is_tuned_model_of(tenant))


def list_models(session: Session, tenant: str) -> list[dict]:
    """Whole, as OpenAI's model list is (no pages): each fine-tuned model costs four columns of its job, not
    the job's row with its JSON."""
    models = [_base(m) for m in list_base_models(session)]
    columns = select(Job.fine_tuned_model, Job.finished_at, Job.created_at, Job.tenant)
    columns = columns.where(_is_tuned_model_of(tenant))
    models += [_fine_tuned(row) for row in session.execute(columns.order_by(Job.finished_at))]
    return models


def tuned_models_page(session: Session, tenant: str, *, after: str | None, limit: int) -> list[tuple[str, dict]]:
    """The tenant's fine-tuned models newest job first, one page by keyset on the job (the dashboard's list: a
    tenant may have thousands), each with its job's id, which is the next page's cursor."""
    columns = select(Job.id, Job.fine_tuned_model, Job.finished_at, Job.created_at, Job.tenant)
    columns = columns.where(_is_tuned_model_of(tenant))
    if after:
        cursor = session.execute(select(Job.created_at, Job.id).where(Job.id == after, Job.tenant == tenant)).first()
        if cursor is not None:
            columns = columns.where(tuple_(Job.created_at, Job.id) < tuple_(cursor.created_at, cursor.id))
    rows = session.execute(columns.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit))
    return [(row.id, _fine_tuned(row)) for row in rows]


def get_model(session: Session, tenant: str, model_id: str) -> dict:
    base = session.get(BaseModelRecord, model_id)
    if base is not None:
        return _base(base)
    return _fine_tuned(tuned_job(session, tenant, model_id))


def delete_model(session: Session, storage: Storage, tenant: str, model_id: str) -> str:
    if session.get(BaseModelRecord, model_id) is not None:
        raise InvalidRequest(f"{model_id} is a base model; only fine-tuned models can be deleted", param="model")
    job = tuned_job(session, tenant, model_id)
    job.model_deleted_at = now()
    job.resume_key = job.resume_sha256 = None
    session.execute(delete(Checkpoint).where(Checkpoint.job_id == job.id).execution_options(synchronize_session=False))
    session.execute(delete(Export).where(Export.job_id == job.id).execution_options(synchronize_session=False))
    session.flush()
    # Before the commit: if storage fails, the deletion rolls back and can be asked again; the other way round,
    # a crash between commit and deletion would leave objects that nothing lists.
    delete_job_objects(storage, job)
    return model_id


def delete_job_objects(storage: Storage, job: Job) -> None:
    """Everything under the job's prefix, every attempt's (`shared.jobs.service.attempt_prefix` lays keys out
    below it)."""
    for key in storage.list_keys(f"tenants/{job.tenant}/jobs/{job.id}/"):
        storage.delete(key)


def tuned_job(session: Session, tenant: str, model_id: str) -> Job:
    job = session.scalars(_tuned(session, tenant).where(Job.fine_tuned_model == model_id)).first()
    if job is None:
        raise ModelNotFound(model_id)
    return job


def _base(record: BaseModelRecord) -> dict:
    return {"id": record.id, "object": "model", "created": record.created_at, "owned_by": "tunequeue"}


def _fine_tuned(job: Job | Row) -> dict:
    return {
        "id": job.fine_tuned_model,
        "object": "model",
        "created": job.finished_at or job.created_at,
        "owned_by": job.tenant,
    }
