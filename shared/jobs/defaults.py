"""Training defaults, defined once: the API's request schema, the job's resolved hyperparameters and the
recipe's own config read them from here. Constants only: the recipe imports this module when it runs
standalone, with no database or settings (keep SQLAlchemy, pydantic-settings and torch out). `Final`, so
that type checkers read "nf4" as the literal it is where a field takes only certain values."""

from typing import Final

# QLoRA (the paper and common practice): LoRA on the attention projections of an NF4 base.
LORA_R: Final = 16
LORA_ALPHA: Final = 32  # an int: it is stored and shown as given (32, not 32.0)
LORA_DROPOUT: Final = 0.05
LORA_TARGET_MODULES: Final = ("q_proj", "k_proj", "v_proj", "o_proj")
QUANTIZATION: Final = "nf4"
MAX_SEQ_LENGTH: Final = 1024
PACKING: Final = True
TRAIN_ON_INPUTS: Final = False
ADAPTER_SELECTION: Final = "best"
DEEPSPEED_STAGE: Final = 2  # ZeRO stage, used only when a job spans several devices

LEARNING_RATE: Final = 2e-4  # QLoRA's rate for small models; learning_rate_multiplier scales it
BATCH_SIZE: Final = 8
LR_SCHEDULER: Final = "linear"
WARMUP_RATIO: Final = 0.03
WEIGHT_DECAY: Final = 0.0
MAX_GRAD_NORM: Final = 1.0
N_CHECKPOINTS: Final = 3
N_EVALS: Final = 5
EARLY_STOPPING_PATIENCE: Final[int | None] = None
