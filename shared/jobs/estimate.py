"""A dry run: everything creating the job would check and resolve, plus how long it would train."""

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.basemodels.models import BaseModelRecord
from shared.basemodels.service import check_target_modules, get_base_model
from shared.jobs.datacheck import check_job_data
from shared.jobs.hyperparameters import resolve_hyperparameters
from shared.jobs.models import Job
from shared.jobs.schemas import DryRun, JobCreate
from shared.jobs.service import training_file
from shared.jobs.status import JobStatus
from shared.settings import Settings
from shared.storage import Storage

# Measured here: SmolLM2-135M, NF4 + LoRA, 2 CPU cores (docs/BENCHMARKS.md); scaled by parameter count.
REFERENCE_TOKENS_PER_SECOND = 230.0
REFERENCE_PARAMETERS = 134_515_008


def dry_run(session: Session, storage: Storage, settings: Settings, tenant: str, request: JobCreate) -> DryRun:
    """Everything a job would check and resolve, plus estimates; nothing is created."""
    base = get_base_model(session, request.model)
    check_target_modules(base, request.lora_target_modules)
    training = training_file(session, tenant, request.training_file, "training_file")
    validation = (
        training_file(session, tenant, request.validation_file, "validation_file") if request.validation_file else None
    )
    hyperparameters = resolve_hyperparameters(request.requested_hyperparameters(), training.line_count)
    check = check_job_data(
        storage,
        settings,
        base,
        training,
        validation,
        max_seq_length=request.max_seq_length,
        train_on_inputs=request.train_on_inputs,
    )
    tokens = int(check.report.get("total_tokens", 0)) * hyperparameters["n_epochs"]
    rate, basis = throughput_estimate(session, base)
    return DryRun(
        valid=check.ok,
        model=base.id,
        hyperparameters=hyperparameters,
        training_options=request.training_options(),
        report=check.report,
        estimated_trained_tokens=tokens,
        estimated_seconds=round(tokens / rate, 1),
        estimate_basis=basis,
    )


def throughput_estimate(session: Session, base: BaseModelRecord) -> tuple[float, str]:
    """Tokens per second for this model: from its finished jobs if any, else scaled from a reference run."""
    recent = session.scalars(
        select(Job)
        .where(Job.model == base.id, Job.status == JobStatus.SUCCEEDED)
        .order_by(Job.finished_at.desc())
        .limit(10)
    ).all()
    rates = [
        j.trained_tokens / (j.finished_at - j.started_at)
        for j in recent
        if j.trained_tokens and j.started_at and j.finished_at and j.finished_at > j.started_at
    ]
    if rates:
        return sum(rates) / len(rates), f"{len(rates)} earlier job(s) of {base.id}, start to finish"
    scaled = REFERENCE_TOKENS_PER_SECOND * REFERENCE_PARAMETERS / max(base.parameters, 1)
    return scaled, "reference run (SmolLM2-135M, NF4 + LoRA, 2 CPU cores) scaled by parameter count"
