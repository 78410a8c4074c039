"""What the training loop drives: one optimizer step on a batch, the learning rate, and the engine's part of
the training state. `LocalEngine` trains on one device; `deepspeed_engine.DeepSpeedEngine` on several ranks."""

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from shared.datasets.tokenization import Encoded
from worker.training import checkpointing
from worker.training.config import TrainingConfig
from worker.training.data import pack_rows, predicted_tokens
from worker.training.evaluation import labelled_loss_sum
from worker.training.model import load_adapter_weights, save_adapter

Collate = Callable[[list[Encoded]], dict[str, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class StepResult:
    loss: float  # the batch's mean over its labelled tokens
    token_accuracy: float
    grad_norm: float  # before clipping


class TrainingEngine(Protocol):
    model: Any  # the PEFT model: validation runs it directly
    writes: bool  # this rank writes the files every rank shares (adapter, manifest, best/)

    def step(self, batch: list[Encoded]) -> StepResult:
        """Forward, backward, clip, optimizer and schedule step on the whole batch, gradients zeroed after."""
        ...

    def learning_rate(self) -> float:
        """The rate the next step trains at."""
        ...

    def save_adapter(self, path: Path) -> None: ...

    def load_adapter(self, path: Path) -> None:
        """Puts the adapter saved in `path` into the model (every rank calls it)."""
        ...

    def save(self, folder: Path, fields: dict[str, Any], rng: dict[str, Any]) -> None:
        """Saves the loop's `fields` and this rank's `rng` with the engine's own state (optimizer, schedule)."""
        ...

    def load(self, folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restores the engine's own state from `folder`; returns the loop's fields and this rank's RNG."""
        ...


def micro_batches(batch: list[Encoded], token_budget: int) -> list[list[Encoded]]:
    """The batch in groups of at most `token_budget` tokens (an example longer than that alone; 0: one group).
    Activation memory grows with the tokens of one forward: a budget bounds it whatever the batch size and
    lengths, and groups of a few hundred tokens still keep the matrix multiplications large."""
    if not token_budget:
        return [batch]
    return pack_rows(batch, max(token_budget, *(len(example.input_ids) for example in batch)))


def steps_in_run(n_examples: int, batch_size: int, n_epochs: int) -> int:
    return math.ceil(n_examples / batch_size) * n_epochs


def optimizer_and_schedule(
    trainable: list[torch.nn.Parameter], config: TrainingConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup_steps = round(config.warmup_ratio * total_steps)
    return optimizer, learning_rate_schedule(optimizer, config.lr_scheduler, warmup_steps, total_steps)


def learning_rate_schedule(
    optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear or cosine decay to zero after a linear warmup, at (k + 1) / (warmup + 1) of the rate on step k
    of the warmup: the first step already learns. transformers' schedule starts its warmup at zero, so it
    runs one step ahead over one step more (`last_epoch=0`), which gives exactly these rates."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])  # what a schedule that does not start at -1 scales
    from transformers import get_scheduler  # here: worker.training.model imports bitsandbytes first

    return get_scheduler(
        kind,
        optimizer,
        num_warmup_steps=warmup_steps + 1,
        num_training_steps=total_steps + 1,
        scheduler_specific_kwargs={"last_epoch": 0},
    )


class LocalEngine:
    """One process on one device; the whole state goes into the folder's state.pt beside the adapter."""

    writes = True

    def __init__(self, model, config: TrainingConfig, collate: Collate, total_steps: int):
        self.model = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = optimizer_and_schedule(self.trainable, config, total_steps)
        self.collate = collate
        self.max_grad_norm = config.max_grad_norm
        self.micro_batch_tokens = config.micro_batch_tokens

    def step(self, batch: list[Encoded]) -> StepResult:
        """The batch's gradient, accumulated over micro-batches: the loss of each is its summed token loss over
        the whole batch's token count, so the sum of their gradients is the batch mean's."""
        self.model.train()
        count = max(1, sum(predicted_tokens(example) for example in batch))
        loss_sum, correct = 0.0, 0
        for part in micro_batches(batch, self.micro_batch_tokens):
            part_loss, part_correct = labelled_loss_sum(self.model, self.collate(part))
            (part_loss / count).backward()
            # .item() is a device sync point; once per micro-batch is fine at these step times.
            loss_sum, correct = loss_sum + float(part_loss.item()), correct + part_correct
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_sum / count, correct / count, float(grad_norm))

    def learning_rate(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save_adapter(self, path: Path) -> None:
        save_adapter(self.model, path)

    def load_adapter(self, path: Path) -> None:
        load_adapter_weights(self.model, path)

    def save(self, folder: Path, fields: dict[str, Any], rng: dict[str, Any]) -> None:
        state = {**fields, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        torch.save({**state, **rng}, folder / checkpointing.STATE_FILE)

    def load(self, folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        state = checkpointing.read_state_file(folder)
        load_adapter_weights(self.model, folder / checkpointing.ADAPTER)
        self.optimizer.load_state_dict(state.pop("optimizer"))
        self.scheduler.load_state_dict(state.pop("scheduler"))
        return state, checkpointing.rng_fields(state)
