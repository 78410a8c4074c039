import secrets

from sqlalchemy import JSON, BigInteger, Boolean, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base


class Job(Base):
    """The job row is the source of truth; every state write goes through `shared.jobs.state`."""

    __tablename__ = "jobs"
    __table_args__ = (
        # Job lists: a tenant's newest first, by keyset on (created_at, id); the admin's, across tenants.
        Index("ix_jobs_tenant_created_id", "tenant", "created_at", "id"),
        Index("ix_jobs_created_id", "created_at", "id"),
        # The admin's throughput (jobs ended in the last hour and day) and recent failures.
        Index("ix_jobs_finished_at", "finished_at"),
        # The metadata filter on Postgres (JSONB containment); SQLite reads each job's metadata instead.
        Index("ix_jobs_user_metadata", text("(CAST(user_metadata AS JSONB))"), postgresql_using="gin").ddl_if(
            dialect="postgresql"
        ),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), default="default")
    status: Mapped[str] = mapped_column(String(32), index=True)
    model: Mapped[str] = mapped_column(String(128))
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(Integer)
    hyperparameters: Mapped[dict] = mapped_column(JSON, default=dict)
    training_options: Mapped[dict] = mapped_column(JSON, default=dict)  # tunequeue's QLoRA knobs
    user_metadata: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    error: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    result_files: Mapped[list] = mapped_column(JSON, default=list)
    adapter_key: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    adapter_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    adapter_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # counted in the tenant's quota
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))  # 0-9, 9 first
    devices: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))  # resources.devices
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # The running attempt's lease: its worker renews it; past it, the sweeper requeues the job.
    lease_expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    progress: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    validation_report: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # The delivered adapter against the base model, as the recipe wrote it (`worker.training.comparison`).
    evaluation: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # An evaluation asked for on demand (`shared.jobs.evaluations`): queued, running, succeeded or failed; the
    # claim of its queued message or running worker, renewed while it runs; why it failed.
    evaluation_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    evaluation_lease_expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    evaluation_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    model_deleted_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    pause_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    resume_key: Mapped[str | None] = mapped_column(String(1024), nullable=True)  # saved training state
    resume_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    started_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    updated_at: Mapped[int] = mapped_column(BigInteger)


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_seq", "job_id", "seq"),)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # order only, never shown
    # The id users see: random, so that no id tells how many events exist or lets one guess another's.
    public_id: Mapped[str | None] = mapped_column(
        String(64), unique=True, index=True, nullable=True, default=lambda: "ftevent-" + secrets.token_hex(12)
    )
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[int] = mapped_column(BigInteger)
    level: Mapped[str] = mapped_column(String(16), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (Index("ix_checkpoints_job_step", "job_id", "step"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    step: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    storage_key: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # counted in the tenant's quota
    # Carries optimizer, schedule, RNG and data position besides the adapter: a later attempt continues from it.
    resumable: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    created_at: Mapped[int] = mapped_column(BigInteger)
