"""The recipe's TrainingConfig, built from the job row in the worker: a bad field fails here, by name, before
a child process starts."""

from pathlib import Path

from pydantic import ValidationError

from shared.settings import Settings
from worker.runner.errors import RecipeFailed
from worker.runner.inputs import JobInputs
from worker.training.config import TrainingConfig
from worker.training.process import INVALID_INPUT_EXIT_CODE


def training_config(
    job_id: str, inputs: JobInputs, settings: Settings, *, model_path: Path, data: dict[str, Path],
    resume_from: Path | None,
) -> TrainingConfig:  # fmt: skip
    """The job's options win over its hyperparameters, which win over the worker's checkpoint settings.
    `learning_rate_multiplier` is folded into the resolved `learning_rate` already: not a recipe field."""
    spec = inputs.spec
    recipe_hyperparameters = {k: v for k, v in spec.hyperparameters.items() if k != "learning_rate_multiplier"}
    fields = {
        "base_model_path": str(model_path),
        "base_model_id": spec.model_id,
        "train_file": str(data["train"]),
        "validation_file": str(data["validation"]) if "validation" in data else None,
        "job_id": job_id,
        "dataset_sha256": inputs.dataset_sha256,
        "seed": spec.seed,
        "hyperparameters": spec.hyperparameters,
        "checkpoint_every_steps": settings.checkpoint_every_steps,
        "checkpoint_every_minutes": settings.checkpoint_every_minutes,
        "resume_from": str(resume_from) if resume_from else None,
        "dataset_cache_dir": settings.resolved_dataset_cache_dir,
        "evaluation_prompts": settings.evaluation_prompts,
        "evaluation_max_new_tokens": settings.evaluation_max_new_tokens,
        **recipe_hyperparameters,
        **spec.options,
    }
    try:
        return TrainingConfig.model_validate(fields)
    except ValidationError as exc:  # as the recipe would report it: the job's config, not the node, is at fault
        raise RecipeFailed({"code": "invalid_config", "message": str(exc)}, INVALID_INPUT_EXIT_CODE, []) from exc


def write_training_config(config: TrainingConfig, path: Path) -> Path:
    path.write_text(config.model_dump_json(indent=2))
    return path
