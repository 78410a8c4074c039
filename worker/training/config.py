"""The recipe's configuration: everything it needs, resolved by the caller. Fails fast, naming every bad field."""

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.jobs import defaults


class TrainingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model_path: Path
    base_model_id: str = "base"
    train_file: Path
    validation_file: Path | None = None
    job_id: str | None = None
    dataset_sha256: str | None = None

    n_epochs: int = Field(default=3, ge=1, le=50)
    batch_size: int = Field(default=defaults.BATCH_SIZE, ge=1, le=256)
    learning_rate: float = Field(default=defaults.LEARNING_RATE, gt=0, le=1)
    lr_scheduler: Literal["linear", "cosine"] = defaults.LR_SCHEDULER
    warmup_ratio: float = Field(default=defaults.WARMUP_RATIO, ge=0, lt=1)
    weight_decay: float = Field(default=defaults.WEIGHT_DECAY, ge=0)
    max_grad_norm: float = Field(default=defaults.MAX_GRAD_NORM, gt=0)
    max_seq_length: int = Field(default=defaults.MAX_SEQ_LENGTH, ge=16)
    seed: int = Field(default=42, ge=0)
    packing: bool = defaults.PACKING
    group_by_length: bool = Field(default=False, description="batch examples of similar length together")
    micro_batch_tokens: int = Field(
        default=512, ge=0, description="tokens per forward and backward within a step (0: the whole batch)"
    )
    train_on_inputs: bool = defaults.TRAIN_ON_INPUTS
    gradient_checkpointing: bool | Literal["auto"] = Field(
        default="auto",
        description="recompute each decoder layer in the backward: less memory, more compute; auto: on only when "
        "the estimated peak memory does not fit the device without it (`shared.jobs.memory`)",
    )

    lora_r: int = Field(default=defaults.LORA_R, ge=1)
    lora_alpha: float = Field(default=defaults.LORA_ALPHA, gt=0)
    lora_dropout: float = Field(default=defaults.LORA_DROPOUT, ge=0, lt=1)
    lora_target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: list(defaults.LORA_TARGET_MODULES)
    )
    quantization: Literal["nf4", "fp4", "int8", "none"] = defaults.QUANTIZATION

    n_checkpoints: int = Field(
        default=defaults.N_CHECKPOINTS, ge=0, le=1000, description="intermediate checkpoints over the run"
    )
    checkpoint_every_steps: int = Field(default=0, ge=0, description="overrides n_checkpoints when set")
    deepspeed_stage: Literal[2, 3] = Field(
        default=defaults.DEEPSPEED_STAGE, description="ZeRO stage when the job spans several devices"
    )
    checkpoint_every_minutes: float = Field(default=0, ge=0, description="also checkpoint after this long; 0: off")
    n_evals: int = Field(
        default=defaults.N_EVALS, ge=0, le=1000, description="evaluations over the run (plus one at the end)"
    )
    early_stopping_patience: int | None = Field(default=defaults.EARLY_STOPPING_PATIENCE, ge=1)
    adapter_selection: Literal["best", "last"] = defaults.ADAPTER_SELECTION
    log_every_steps: int = Field(default=1, ge=1)
    evaluation_prompts: int = Field(
        default=3, ge=0, le=50, description="validation prompts the base and the tuned model answer at the end; 0: none"
    )
    evaluation_max_new_tokens: int = Field(default=64, ge=1, le=4096, description="the longest of those answers")
    resume_from: Path | None = Field(default=None, description="a folder saved by a pause: continue from it")
    dataset_cache_dir: Path | None = Field(default=None, description="keep tokenised examples here between runs")
    hyperparameters: dict = Field(default_factory=dict, description="As resolved on the job, for the manifest")

    @classmethod
    def from_file(cls, path: Path) -> "TrainingConfig":
        return cls.model_validate(json.loads(Path(path).read_text()))
