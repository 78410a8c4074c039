"""OpenAI's "auto" hyperparameters resolved against the training data: what a job records and trains with."""

import math

from shared.jobs import defaults
from shared.jobs.schemas import Hyperparameters

TARGET_EXAMPLE_PASSES = 600  # "auto" epochs: about this many examples seen, 1 to 10 epochs
FEW_STEPS = 300  # "auto" learning rate: a short run (fewer optimizer steps) takes larger ones
FEW_STEPS_MULTIPLIER = 5.0


def resolve_hyperparameters(requested: Hyperparameters, n_examples: int) -> dict:
    n_examples = max(n_examples, 1)
    n_epochs = (
        max(1, min(10, math.ceil(TARGET_EXAMPLE_PASSES / n_examples)))
        if requested.n_epochs == "auto"
        else requested.n_epochs
    )
    batch_size = min(defaults.BATCH_SIZE, n_examples) if requested.batch_size == "auto" else requested.batch_size
    multiplier = requested.learning_rate_multiplier
    if multiplier == "auto":
        steps = n_epochs * math.ceil(n_examples / batch_size)
        multiplier = FEW_STEPS_MULTIPLIER if steps < FEW_STEPS else 1.0
    learning_rate = requested.learning_rate
    if learning_rate == "auto":
        learning_rate = defaults.LEARNING_RATE * multiplier

    def pick(value, default):
        return default if value == "auto" else value

    return {
        "n_epochs": n_epochs,
        "batch_size": batch_size,
        "learning_rate_multiplier": float(multiplier),
        "learning_rate": float(learning_rate),
        "lr_scheduler": pick(requested.lr_scheduler, defaults.LR_SCHEDULER),
        "warmup_ratio": pick(requested.warmup_ratio, defaults.WARMUP_RATIO),
        "weight_decay": pick(requested.weight_decay, defaults.WEIGHT_DECAY),
        "max_grad_norm": pick(requested.max_grad_norm, defaults.MAX_GRAD_NORM),
        "n_checkpoints": pick(requested.n_checkpoints, defaults.N_CHECKPOINTS),
        "n_evals": pick(requested.n_evals, defaults.N_EVALS),
        "early_stopping_patience": pick(requested.early_stopping_patience, defaults.EARLY_STOPPING_PATIENCE),
    }
