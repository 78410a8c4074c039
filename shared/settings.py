"""Runtime settings. With nothing set, tunequeue runs on embedded defaults under `./.tunequeue/`:
SQLite for the database, kombu's SQLAlchemy transport on SQLite for the broker, a local folder for storage.
Production sets `TUNEQUEUE_DATABASE_URL` (Postgres), `TUNEQUEUE_BROKER_URL` (Redis) and
`TUNEQUEUE_STORAGE_URL` (`s3://bucket/prefix` with `TUNEQUEUE_S3_ENDPOINT_URL` for MinIO)."""

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEQUEUE_", extra="ignore")

    data_dir: Path = Field(default=Path(".tunequeue"), description="Folder for embedded-mode state and models")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite in data_dir")
    broker_url: str | None = Field(default=None, description="Celery broker; default SQLAlchemy on SQLite")
    storage_url: str | None = Field(default=None, description="file:///path or s3://bucket/prefix")
    s3_endpoint_url: str | None = Field(default=None, description="S3 endpoint (MinIO, moto, ...)")
    model_dir: Path | None = Field(default=None, description="Local base-model cache; default data_dir/models")
    queue_name: str = Field(default="tunequeue", description="Celery queue that training jobs go to")
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, description="Largest accepted upload")
    heartbeat_seconds: float = Field(default=10.0, description="Worker heartbeat interval")
    metrics_interval_seconds: float = Field(default=2.0, description="Least time between metric events")
    cancel_poll_seconds: float = Field(default=1.0, description="How often a worker checks for cancel")
    checkpoint_every_steps: int = Field(default=0, description="Steps between checkpoints; 0: the job's n_checkpoints")
    checkpoint_every_minutes: float = Field(default=30.0, description="Most minutes between checkpoints; 0: off")
    lease_seconds: float = Field(default=60.0, description="A running job's lease; renewed by its worker")
    sweep_seconds: float = Field(default=15.0, description="How often each worker reaps leases and republishes")
    worker_idle_transaction_seconds: float = Field(
        default=60.0,
        description="Postgres ends a worker's transaction left idle this long, so that a frozen worker's row "
        "locks cannot block the takeover of its jobs; 0: off",
    )
    republish_after_seconds: float = Field(default=60.0, description="Queued this long with no message: publish")
    max_attempts: int = Field(default=3, description="Attempts per job before it fails with worker_lost")
    storage_retries: int = Field(default=5, description="Tries for each object-storage write or read")
    max_active_jobs_per_tenant: int = Field(default=100, description="Unfinished jobs a tenant may have (429)")
    max_queued_jobs_per_tenant: int = Field(default=50, description="Jobs a tenant may have waiting (429)")
    max_running_jobs_per_tenant: int = Field(default=8, description="Jobs of one tenant training at once")
    max_tenant_priority: int = Field(default=5, description="Highest job priority (0-9) a tenant key may set")
    slot_wait_seconds: float = Field(default=2.0, description="How long a job waits for a worker's free slot")
    max_request_bytes: int = Field(default=1024 * 1024, description="Largest request body, uploads aside (413)")
    max_file_lines: int = Field(default=2_000_000, description="Most lines in an uploaded file")
    max_line_bytes: int = Field(default=1024 * 1024, description="Longest line in an uploaded file")
    webhook_retry_base_seconds: float = Field(default=2.0, description="First webhook retry delay; doubles")
    training_python: str | None = Field(default=None, description="Python that runs the recipe")

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.resolved_data_dir / 'tunequeue.db'}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.resolved_data_dir / 'broker.db'}"

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or f"file://{self.resolved_data_dir / 'storage'}"

    @property
    def resolved_model_dir(self) -> Path:
        return (self.model_dir or self.resolved_data_dir / "models").expanduser().resolve()

    @property
    def embedded(self) -> bool:
        return self.database_url is None


@lru_cache
def get_settings() -> Settings:
    settings = Settings()
    if settings.embedded or settings.storage_url is None:
        settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    return settings
