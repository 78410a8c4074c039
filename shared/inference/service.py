"""Which model a completion request names: a base model (served bare) or one of the tenant's fine-tuned models
(its base, with the job's adapter). Another tenant's fine-tuned model is not found, exactly as in /v1/models."""

import dataclasses

from sqlalchemy.orm import Session

from shared.basemodels.models import BaseModelRecord
from shared.catalog.service import tuned_job


@dataclasses.dataclass(frozen=True)
class Target:
    model: str  # as the request named it
    base: str
    adapter: dict | None  # {"name": job id, "key": storage key, "sha256": ...}

    def worker_fields(self) -> dict:
        return {"base": self.base, "adapter": self.adapter}


def resolve(session: Session, tenant: str, model_id: str) -> Target:
    if session.get(BaseModelRecord, model_id) is not None:
        return Target(model=model_id, base=model_id, adapter=None)
    job = tuned_job(session, tenant, model_id)
    adapter = {"name": job.id, "key": job.adapter_key, "sha256": job.adapter_sha256}
    return Target(model=model_id, base=job.model, adapter=adapter)
