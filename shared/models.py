"""Every ORM model, imported in one place so that metadata (Alembic, tests) sees all tables."""

from shared.auth.models import ApiKey, UiSession
from shared.basemodels.models import BaseModelRecord
from shared.db import Base
from shared.exports.models import Export
from shared.files.models import File
from shared.idempotency.models import IdempotencyKey
from shared.inference.models import InferenceRequest
from shared.jobs.models import Checkpoint, Job, JobEvent
from shared.webhooks.models import WebhookDelivery, WebhookEndpoint
from shared.workers.models import DeviceUsage, WorkerHeartbeat

__all__ = [
    "ApiKey",
    "Base",
    "BaseModelRecord",
    "Checkpoint",
    "DeviceUsage",
    "Export",
    "File",
    "IdempotencyKey",
    "InferenceRequest",
    "Job",
    "JobEvent",
    "UiSession",
    "WebhookDelivery",
    "WebhookEndpoint",
    "WorkerHeartbeat",
]
