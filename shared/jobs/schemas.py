"""Request and response shapes of the fine-tuning API: OpenAI's fields, with tunequeue's QLoRA knobs beside
them. Unknown fields are refused so that a typo ("lora_rank") is an error, not a silent default."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import Row

from shared.jobs import defaults
from shared.jobs.models import Checkpoint, Job, JobEvent
from shared.jobs.status import JobStatus

ModuleName = Annotated[str, Field(min_length=1, max_length=128)]
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"  # no control characters (Postgres text cannot even hold a NUL)
MetadataKey = Annotated[str, Field(max_length=64, pattern=PRINTABLE)]
MetadataValue = Annotated[str, Field(max_length=512, pattern=PRINTABLE)]


class Hyperparameters(BaseModel):
    """OpenAI's three, then tunequeue's; every one takes "auto" or a value and is resolved on the job."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: Literal["auto"] | int = Field(default="auto")
    batch_size: Literal["auto"] | int = Field(default="auto")
    learning_rate_multiplier: Literal["auto"] | float = Field(default="auto")
    learning_rate: Literal["auto"] | float = Field(default="auto", description="absolute; wins over the multiplier")
    lr_scheduler: Literal["auto", "linear", "cosine"] = "auto"
    warmup_ratio: Literal["auto"] | Annotated[float, Field(ge=0, lt=1)] = "auto"
    weight_decay: Literal["auto"] | Annotated[float, Field(ge=0, le=1)] = "auto"
    max_grad_norm: Literal["auto"] | Annotated[float, Field(gt=0)] = "auto"
    n_checkpoints: Literal["auto"] | Annotated[int, Field(ge=0, le=100)] = "auto"
    n_evals: Literal["auto"] | Annotated[int, Field(ge=0, le=1000)] = "auto"
    early_stopping_patience: Literal["auto"] | None | Annotated[int, Field(ge=1, le=100)] = "auto"

    @field_validator("learning_rate")
    @classmethod
    def _absolute_lr(cls, value):
        if value != "auto" and not 0 < value <= 1:
            raise ValueError("must be 'auto' or a number above 0 and at most 1")
        return value

    @field_validator("n_epochs")
    @classmethod
    def _epochs(cls, value):
        if value != "auto" and not 1 <= value <= 50:
            raise ValueError("must be 'auto' or an integer from 1 to 50")
        return value

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, value):
        if value != "auto" and not 1 <= value <= 256:
            raise ValueError("must be 'auto' or an integer from 1 to 256")
        return value

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _lr(cls, value):
        if value != "auto" and not 0 < value <= 100:
            raise ValueError("must be 'auto' or a number above 0 and at most 100")
        return value


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised"] = "supervised"
    supervised: SupervisedMethod | None = None


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")
    devices: int = Field(default=1, ge=1, le=8, description="GPUs (or CPU slots) the job trains on at once")


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    suffix: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9_-]*$")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)] | None = None
    hyperparameters: Hyperparameters | None = None  # deprecated by OpenAI in favour of `method`
    method: Method | None = None
    integrations: list[Any] | None = None
    # tunequeue's QLoRA knobs
    lora_r: int = Field(default=defaults.LORA_R, ge=1, le=1024)
    lora_alpha: float = Field(default=defaults.LORA_ALPHA, gt=0)
    lora_dropout: float = Field(default=defaults.LORA_DROPOUT, ge=0, lt=1)
    lora_target_modules: Annotated[list[ModuleName], Field(min_length=1, max_length=256)] | Literal["all-linear"] = (
        Field(default_factory=lambda: list(defaults.LORA_TARGET_MODULES))
    )
    quantization: Literal["nf4", "fp4", "int8", "none"] = defaults.QUANTIZATION
    max_seq_length: int = Field(default=defaults.MAX_SEQ_LENGTH, ge=16, le=131072)
    packing: bool = defaults.PACKING
    train_on_inputs: bool = defaults.TRAIN_ON_INPUTS
    adapter_selection: Literal["best", "last"] = defaults.ADAPTER_SELECTION
    dry_run: bool = Field(default=False, description="validate and estimate; create no job")
    priority: int = Field(default=0, ge=0, le=9, description="9 runs first; tenant keys are capped (admins: 9)")
    resources: Resources = Field(default_factory=Resources)
    deepspeed_stage: Literal[2, 3] = Field(
        default=defaults.DEEPSPEED_STAGE, description="ZeRO stage when resources.devices > 1"
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        default="auto",
        description="recompute each layer in the backward pass: far less activation memory for about a third more "
        "compute; auto: on only when the job's estimated peak memory does not fit its device without it",
    )

    @field_validator("lora_target_modules")
    @classmethod
    def _targets(cls, value):
        if isinstance(value, list) and (not value or not all(isinstance(v, str) and v for v in value)):
            raise ValueError("must be 'all-linear' or a non-empty list of module names")
        return value

    def requested_hyperparameters(self) -> Hyperparameters:
        if self.method and self.method.supervised:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()

    def training_options(self) -> dict:
        return {
            "lora_r": self.lora_r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "lora_target_modules": self.lora_target_modules,
            "quantization": self.quantization,
            "max_seq_length": self.max_seq_length,
            "packing": self.packing,
            "train_on_inputs": self.train_on_inputs,
            "adapter_selection": self.adapter_selection,
            "deepspeed_stage": self.deepspeed_stage,
            "gradient_checkpointing": self.gradient_checkpointing,
        }


class DryRun(BaseModel):
    """What `"dry_run": true` returns instead of a job."""

    object: Literal["fine_tuning.job.dry_run"] = "fine_tuning.job.dry_run"
    valid: bool
    model: str
    hyperparameters: dict
    training_options: dict
    report: dict
    estimated_trained_tokens: int
    estimated_seconds: float
    estimate_basis: str


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    id: str
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: dict
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: JobStatus
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None
    integrations: list = Field(default_factory=list)
    metadata: dict[str, str] | None = None
    method: dict
    user_provided_suffix: str | None = None
    # tunequeue's additions
    training_options: dict
    progress: dict | None = None
    validation_report: dict | None = None
    priority: int = 0
    resources: dict = Field(default_factory=lambda: {"devices": 1})

    @classmethod
    def of(cls, job: Job) -> "FineTuningJob":
        return cls(
            id=job.id,
            created_at=job.created_at,
            error=JobError(**job.error) if job.error else None,
            fine_tuned_model=job.fine_tuned_model,
            finished_at=job.finished_at,
            hyperparameters=job.hyperparameters,
            model=job.model,
            organization_id=job.tenant,
            result_files=job.result_files or [],
            seed=job.seed,
            status=JobStatus(job.status),
            trained_tokens=job.trained_tokens,
            training_file=job.training_file,
            validation_file=job.validation_file,
            estimated_finish=job.estimated_finish,
            metadata=job.user_metadata,
            method={"type": "supervised", "supervised": {"hyperparameters": job.hyperparameters}},
            user_provided_suffix=job.suffix,
            training_options=job.training_options,
            progress=job.progress,
            validation_report=job.validation_report,
            priority=job.priority,
            resources={"devices": job.devices},
        )


class TenantJob(FineTuningJob):
    """A job on the admin routes, which cross tenants: the job and whose it is."""

    tenant: str

    @classmethod
    def of(cls, job: Job) -> "TenantJob":
        return cls(**dict(FineTuningJob.of(job)), tenant=job.tenant)


class JobEventObject(BaseModel):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: int
    level: str
    message: str
    type: str
    data: dict | None = None

    @classmethod
    def of(cls, event: JobEvent | Row) -> "JobEventObject":
        """From the ORM object or a row of every column (the polled page reads rows)."""
        return cls(
            # Random, not the row's sequence number: an id tells nothing of how many events exist. Every row has
            # one (the ORM's default; the migration that added the column filled the older rows).
            id=event.public_id or "",
            created_at=event.created_at,
            level=event.level,
            message=event.message,
            type=event.type,
            data=event.data,
        )


class CheckpointObject(BaseModel):
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict
    step_number: int

    @classmethod
    def of(cls, checkpoint: Checkpoint, fine_tuned_model_base: str) -> "CheckpointObject":
        return cls(
            id=checkpoint.id,
            created_at=checkpoint.created_at,
            fine_tuned_model_checkpoint=f"{fine_tuned_model_base}:ckpt-step-{checkpoint.step}",
            fine_tuning_job_id=checkpoint.job_id,
            metrics={"step": checkpoint.step, **checkpoint.metrics},
            step_number=checkpoint.step,
        )


class EvaluationScores(BaseModel):
    loss: float = Field(description="mean cross-entropy per trained validation token (assistant turns, end included)")
    token_accuracy: float = Field(description="share of those tokens the model's most likely token gets right")


class TunedScores(EvaluationScores):
    step: int | None = Field(None, description="the step whose adapter was delivered")
    selection: str = Field(description="`best` (lowest validation loss) or `last`, as the job's adapter_selection")


class EvaluationSample(BaseModel):
    prompt: str = Field(description="what both models were given, verbatim (chat data: rendered by the template)")
    reference: str = Field(description="the validation example's own answer")
    base: str = Field(description="the base model's greedy answer")
    tuned: str = Field(description="the fine-tuned model's greedy answer")


class JobEvaluation(BaseModel):
    """tunequeue's own: a succeeded job's adapter against its base model, on the job's validation set."""

    object: Literal["fine_tuning.job.evaluation"] = "fine_tuning.job.evaluation"
    fine_tuning_job_id: str
    model: str
    fine_tuned_model: str | None
    status: Literal["succeeded"] = "succeeded"
    created_at: int
    validation_examples: int
    base: EvaluationScores
    tuned: TunedScores
    improved: bool = Field(description="the tuned model's validation loss is lower than the base model's")
    samples: list[EvaluationSample]
    max_new_tokens: int | None = Field(None, description="the most tokens each sample answer could have")
    samples_error: str | None = Field(None, description="why there are no sample answers, when none could be made")

    @classmethod
    def of(cls, job: Job) -> "JobEvaluation":
        assert job.evaluation is not None
        return cls.build(job.id, job.model, job.fine_tuned_model, job.evaluation)

    @classmethod
    def build(cls, job_id: str, model: str, fine_tuned_model: str | None, stored: dict) -> "JobEvaluation":
        """From the evaluation as the recipe wrote it (`worker.training.comparison.build_evaluation`)."""
        fields = ("created_at", "validation_examples", "base", "tuned", "improved", "samples", "max_new_tokens",
                  "samples_error")  # fmt: skip
        return cls.model_validate(
            {"fine_tuning_job_id": job_id, "model": model, "fine_tuned_model": fine_tuned_model}
            | {name: stored.get(name) for name in fields if stored.get(name) is not None}
        )


class EvaluationState(BaseModel):
    """An evaluation asked for on demand (`POST /v1/fine_tuning/jobs/{id}/evaluation`) that has no figures yet:
    `queued` or `running`, or `failed` with the reason (ask again to start it anew)."""

    object: Literal["fine_tuning.job.evaluation"] = "fine_tuning.job.evaluation"
    fine_tuning_job_id: str
    model: str
    fine_tuned_model: str | None
    status: Literal["queued", "running", "failed"]
    error: str | None = Field(None, description="why it failed")

    @classmethod
    def of(cls, job: Job, status: str, error: str | None) -> "EvaluationState":
        shown = {"fine_tuning_job_id": job.id, "model": job.model, "fine_tuned_model": job.fine_tuned_model}
        return cls.model_validate({**shown, "status": status, "error": error})
