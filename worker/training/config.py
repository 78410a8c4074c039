"""The recipe's configuration: everything it needs, resolved by the caller. Fails fast, naming every bad field."""

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class TrainingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model_path: Path
    base_model_id: str = "base"
    train_file: Path
    validation_file: Path | None = None
    job_id: str | None = None
    dataset_sha256: str | None = None

    n_epochs: int = Field(default=3, ge=1, le=50)
    batch_size: int = Field(default=8, ge=1, le=256)
    learning_rate: float = Field(default=2e-4, gt=0, le=1)
    lr_scheduler: Literal["linear", "cosine"] = "linear"
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    max_seq_length: int = Field(default=1024, ge=16)
    seed: int = Field(default=42, ge=0)
    packing: bool = True
    train_on_inputs: bool = False

    lora_r: int = Field(default=16, ge=1)
    lora_alpha: float = Field(default=32, gt=0)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    lora_target_modules: list[str] | Literal["all-linear"] = Field(default_factory=lambda: list(DEFAULT_TARGETS))
    quantization: Literal["nf4", "fp4", "int8", "none"] = "nf4"

    n_checkpoints: int = Field(default=3, ge=0, le=1000, description="intermediate checkpoints over the run")
    checkpoint_every_steps: int = Field(default=0, ge=0, description="overrides n_checkpoints when set")
    deepspeed_stage: Literal[2, 3] = Field(default=2, description="ZeRO stage when the job spans several devices")
    checkpoint_every_minutes: float = Field(default=0, ge=0, description="also checkpoint after this long; 0: off")
    n_evals: int = Field(default=5, ge=0, le=1000, description="evaluations over the run (plus one at the end)")
    early_stopping_patience: int | None = Field(default=None, ge=1)
    adapter_selection: Literal["best", "last"] = "best"
    log_every_steps: int = Field(default=1, ge=1)
    resume_from: Path | None = Field(default=None, description="a folder saved by a pause: continue from it")
    hyperparameters: dict = Field(default_factory=dict, description="As resolved on the job, for the manifest")

    @classmethod
    def from_file(cls, path: Path) -> "TrainingConfig":
        return cls.model_validate(json.loads(Path(path).read_text()))
