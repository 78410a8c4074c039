"""Runtime settings. With nothing set, tunequeue runs on embedded defaults under `./.tunequeue/`:
SQLite for the database, kombu's SQLAlchemy transport on SQLite for the broker, a local folder for storage.
Production sets `TUNEQUEUE_DATABASE_URL` (Postgres), `TUNEQUEUE_BROKER_URL` (Redis) and
`TUNEQUEUE_STORAGE_URL` (`s3://bucket/prefix` with `TUNEQUEUE_S3_ENDPOINT_URL` for MinIO).

Each area declares its settings in a class of its own; `Settings` is all of them at once. The areas are mixed
in rather than nested so that every setting keeps its flat name (`settings.queue_name`, `TUNEQUEUE_QUEUE_NAME`)
and one validation reports every bad variable together."""

from functools import lru_cache
from pathlib import Path

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "TUNEQUEUE_"


class _Area(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    data_dir: Path = Field(default=Path(".tunequeue"), description="Folder for embedded-mode state and models")

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()


class DatabaseSettings(_Area):
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite in data_dir")
    worker_idle_transaction_seconds: float = Field(
        default=60.0,
        ge=0,
        description="Postgres ends a worker's transaction left idle this long, so that a frozen worker's row "
        "locks cannot block the takeover of its jobs; 0: off",
    )

    api_key_cache_seconds: float | None = Field(
        default=None,
        ge=0,
        le=60,
        description="How long an API process trusts a key it verified before reading it again (revocation by "
        "another process takes this long; through the same process, none); unset: 2 on Postgres, 0 on SQLite",
    )

    ui_session_hours: float = Field(
        default=12.0, gt=0, le=24 * 30, description="How long a dashboard sign-in lasts before the key is asked again"
    )

    @property
    def resolved_api_key_cache_seconds(self) -> float:
        # SQLite is a local file read, no round trip to save: every request reads the key, as before.
        if self.api_key_cache_seconds is not None:
            return self.api_key_cache_seconds
        return 0.0 if self.resolved_database_url.startswith("sqlite") else 2.0

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.resolved_data_dir / 'tunequeue.db'}"

    @property
    def embedded(self) -> bool:
        return self.database_url is None


class QueueSettings(_Area):
    broker_url: str | None = Field(default=None, description="Celery broker; default SQLAlchemy on SQLite")
    queue_name: str = Field(default="tunequeue", min_length=1, description="Celery queue that training jobs go to")
    republish_after_seconds: float = Field(default=60.0, ge=0, description="Queued this long with no message: publish")

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.resolved_data_dir / 'broker.db'}"


class StorageSettings(_Area):
    storage_url: str | None = Field(default=None, description="file:///path or s3://bucket/prefix")
    s3_endpoint_url: str | None = Field(default=None, description="S3 endpoint (MinIO, moto, ...)")
    model_dir: Path | None = Field(default=None, description="Local base-model cache; default data_dir/models")
    dataset_cache_dir: Path | None = Field(
        default=None, description="Local cache of tokenised training data; default data_dir/dataset-cache"
    )
    dataset_cache_mb: int = Field(default=2048, ge=0, description="Most MB the dataset cache keeps; 0: no cache")
    storage_retries: int = Field(default=5, ge=1, description="Tries for each object-storage write or read")

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or (self.resolved_data_dir / "storage").as_uri()

    @property
    def resolved_model_dir(self) -> Path:
        return (self.model_dir or self.resolved_data_dir / "models").expanduser().resolve()

    @property
    def resolved_dataset_cache_dir(self) -> Path | None:
        if self.dataset_cache_mb == 0:
            return None
        return (self.dataset_cache_dir or self.resolved_data_dir / "dataset-cache").expanduser().resolve()


class WebhookSettings(_Area):
    webhook_retry_base_seconds: float = Field(default=2.0, gt=0, description="First webhook retry delay; doubles")
    webhook_workers: int = Field(default=4, ge=1, le=64, description="Webhook deliveries sent at once per process")
    webhook_timeout_seconds: float = Field(
        default=10.0, gt=0, le=120, description="One webhook attempt's whole deadline: connect, send, read"
    )
    webhook_max_attempts: int = Field(default=8, ge=1, le=32, description="Attempts per webhook delivery")
    webhook_disable_after_failures: int = Field(
        default=20, ge=1, description="Consecutive failed attempts after which an endpoint is disabled"
    )
    webhook_max_endpoints_per_tenant: int = Field(default=10, ge=0, description="Webhook endpoints per tenant (429)")
    webhook_allowed_networks: str = Field(
        default="",
        description="Comma-separated CIDRs that webhooks may reach although private or loopback "
        "(e.g. 10.0.0.0/8); empty: public addresses only",
    )
    secret_keys: str = Field(
        default="",
        description="Comma-separated Fernet keys that encrypt webhook secrets at rest; the first encrypts, all "
        "decrypt (rotation). Empty: a key generated once in data_dir/secret.key",
    )


class LimitSettings(_Area):
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, gt=0, description="Largest accepted upload")
    max_request_bytes: int = Field(default=1024 * 1024, gt=0, description="Largest request body, uploads aside (413)")
    max_file_lines: int = Field(default=2_000_000, gt=0, description="Most lines in an uploaded file")
    max_line_bytes: int = Field(default=1024 * 1024, gt=0, description="Longest line in an uploaded file")
    max_active_jobs_per_tenant: int = Field(default=100, ge=0, description="Unfinished jobs a tenant may have (429)")
    max_queued_jobs_per_tenant: int = Field(default=50, ge=0, description="Jobs a tenant may have waiting (429)")
    max_running_jobs_per_tenant: int = Field(default=8, ge=0, description="Jobs of one tenant training at once")
    max_tenant_priority: int = Field(
        default=5, ge=0, le=9, description="Highest job priority (0-9) a tenant key may set"
    )
    event_stream_max_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="Longest a job's event stream stays open; clients reconnect with Last-Event-ID",
    )
    max_messages_per_example: int = Field(default=1024, gt=0, description="Most messages in one chat example")
    max_tokens_per_example: int = Field(
        default=131_072, gt=0, description="Most tokens in one example (one line), before truncation to max length"
    )
    dry_run_timeout_seconds: float = Field(
        default=60.0, gt=0, description="Longest a dry run may take before it is refused (408, with the limit)"
    )
    max_concurrent_dry_runs: int = Field(default=2, ge=1, description="Dry runs at once per API process (429)")
    max_concurrent_uploads_per_tenant: int = Field(
        default=2, ge=1, description="Uploads of one tenant in flight at once per API process (429)"
    )
    storage_quota_bytes: int = Field(
        default=50 * 1024**3, ge=0, description="Bytes a tenant may hold: files, checkpoints, adapters (413)"
    )
    max_files_per_tenant: int = Field(default=1000, ge=0, description="Files a tenant may hold (429)")


class WorkerSettings(_Area):
    heartbeat_seconds: float = Field(default=10.0, gt=0, description="Worker heartbeat interval")
    metrics_interval_seconds: float = Field(default=2.0, ge=0, description="Least time between metric events")
    cancel_poll_seconds: float = Field(default=1.0, gt=0, description="How often a worker checks for cancel")
    checkpoint_every_steps: int = Field(
        default=0, ge=0, description="Steps between checkpoints; 0: the job's n_checkpoints"
    )
    checkpoint_every_minutes: float = Field(default=30.0, ge=0, description="Most minutes between checkpoints; 0: off")
    lease_seconds: float = Field(default=60.0, gt=0, description="A running job's lease; renewed by its worker")
    sweep_seconds: float = Field(default=15.0, gt=0, description="How often each worker reaps leases and republishes")
    max_attempts: int = Field(default=3, ge=1, description="Attempts per job before it fails with worker_lost")
    keep_checkpoints: int = Field(
        default=2, ge=1, description="Newest resumable checkpoints kept per job; older ones are collected"
    )
    evaluation_prompts: int = Field(
        default=3,
        ge=0,
        le=50,
        description="Validation prompts that the base and the tuned model answer (greedy) in each job's evaluation; "
        "0: no answers, the scores only",
    )
    evaluation_max_new_tokens: int = Field(
        default=64, ge=1, le=4096, description="Most tokens of each of those answers"
    )
    export_max_loss_drift: float = Field(
        default=0.01,
        ge=0,
        description="Largest relative difference between a merged export's held-out loss and the model's as "
        "trained; an export past it fails with its figures",
    )
    export_shard_mb: int = Field(default=2048, ge=1, description="Largest weight shard of a merged export, in MiB")
    slot_wait_seconds: float = Field(default=2.0, ge=0, description="How long a job waits for a worker's free slot")
    training_python: str | None = Field(default=None, description="Python that runs the recipe")
    warm_runtimes: int | None = Field(
        default=None,
        ge=0,
        description="Recipe processes kept ready (libraries loaded) per worker; unset: one per device slot; 0: off",
    )
    warm_runtime_fork: bool | None = Field(
        default=None,
        description="Fork ready recipe processes from one process per worker that loaded the libraries once; "
        "false: each ready process starts its own interpreter and loads them; unset: fork on CPU workers only",
    )
    slot_memory_mb: int = Field(
        default=0,
        ge=0,
        description="Memory one device slot offers a job, in MiB; 0: measured (a GPU's own memory; on a CPU node, "
        "its RAM divided among its CPU slots). Jobs whose estimated peak does not fit are refused",
    )
    training_allocator: str = Field(
        default="auto",
        description="Memory allocator preloaded into the recipe's processes: 'auto' (jemalloc where the system "
        "has it, libjemalloc.so.2), 'system' (glibc's malloc), or the path of an allocator library",
    )

    @field_validator("training_allocator")
    @classmethod
    def _allocator_exists(cls, value: str) -> str:
        if value not in ("auto", "system") and not Path(value).is_file():
            raise ValueError(f"{value!r} is no file: give 'auto', 'system' or the path of an allocator library")
        return value


class InferenceSettings(_Area):
    """Serving fine-tuned models through chat.completions (docs/inference.md)."""

    inference_quantization: str = Field(
        default="nf4",
        pattern="^(nf4|int8|none)$",
        description="How an inference worker holds its base models: nf4 (4-bit), int8, or none (16-bit)",
    )
    inference_adapters: int = Field(
        default=8, ge=1, description="Adapters an inference worker keeps loaded per base (least recently used goes)"
    )
    inference_max_batch: int = Field(
        default=8, ge=1, description="Most sequences an inference worker decodes together on one base"
    )
    inference_max_tokens: int = Field(
        default=512, ge=1, description="Completion tokens a request gets when it names no max_tokens"
    )
    inference_max_n: int = Field(default=8, ge=1, description="Most choices (n) one completion request may ask for")
    inference_timeout_seconds: float = Field(
        default=300.0,
        gt=0,
        description="Longest a completion request may run before it is ended (504 or an error event)",
    )
    inference_concurrency_per_tenant: int = Field(
        default=4, ge=1, description="Completion requests of one tenant in flight at once, over all API processes (429)"
    )
    inference_heartbeat_seconds: float = Field(
        default=5.0, gt=0, description="How often an inference worker reports its endpoint and what it holds"
    )


class Settings(
    DatabaseSettings, QueueSettings, StorageSettings, WebhookSettings, LimitSettings, WorkerSettings, InferenceSettings
):
    pass


class InvalidSettings(ValueError):
    """Raised at start-up, naming every variable whose value is refused."""

    @classmethod
    def of(cls, error: ValidationError) -> "InvalidSettings":
        problems = []
        for item in error.errors():
            name = ENV_PREFIX + ".".join(str(part) for part in item["loc"]).upper()
            problems.append(f"{name}={item.get('input')!r}: {item['msg']}")
        return cls("invalid settings: " + "; ".join(problems))


@lru_cache
def get_settings() -> Settings:
    try:
        settings = Settings()
    except ValidationError as exc:
        raise InvalidSettings.of(exc) from None
    if settings.embedded or settings.storage_url is None:
        settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    return settings
