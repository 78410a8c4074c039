"""The engine on several ranks: DeepSpeed ZeRO over `torchrun`'s processes, each on its share of every batch.

Its training state is spread over the folder: `state.pt` (rank 0: the loop's fields and the world size),
`rng-rank-<r>.pt` (each rank's RNG) and `deepspeed/` (each rank's ZeRO shard of the optimizer, the fp32
master weights and the schedule; never the frozen 4-bit base)."""

from pathlib import Path
from typing import Any

import torch

from shared.datasets.tokenization import Encoded
from worker.training import checkpointing, distributed
from worker.training.config import TrainingConfig
from worker.training.data import masked, predicted_tokens
from worker.training.engine import Collate, StepResult, optimizer_and_schedule
from worker.training.evaluation import labelled_logits, token_loss_sum
from worker.training.model import load_adapter_weights, save_adapter

DEEPSPEED_STATE = "deepspeed"
DEEPSPEED_TAG = "state"


def _load_trainable(src: dict, dst) -> None:
    """The module half of a DeepSpeed checkpoint holds the trainable (LoRA) weights, not the frozen 4-bit base
    (never saved). Under ZeRO-3 they are partitioned and come back from each rank's fp32 master shard instead."""
    trainable = {name for name, param in dst.named_parameters() if param.requires_grad}
    dst.load_state_dict({name: value for name, value in src.items() if name in trainable}, strict=False)


def _keep_module(src: dict, dst) -> None:
    """ZeRO-3: nothing to load into the module here (see `_load_trainable`)."""


class DeepSpeedEngine:
    def __init__(self, model, config: TrainingConfig, collate: Collate, total_steps: int):
        self.model = model
        self.writes = distributed.rank() == 0
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.stage = config.deepspeed_stage
        self.collate = collate
        optimizer, scheduler = optimizer_and_schedule(self.trainable, config, total_steps)
        micro_batch = max(1, config.batch_size // distributed.world_size())
        self.engine, self.optimizer, self.scheduler = distributed.wrap(
            model, optimizer, scheduler, self.trainable, self.stage, micro_batch, config.max_grad_norm
        )

    def step(self, batch: list[Encoded]) -> StepResult:
        """The loss is the batch's mean over its loss tokens, as on one process: each rank backpropagates the
        sum over its own tokens divided by the batch's token count (every rank holds the whole batch, so it
        knows that count without asking), times the number of ranks, since DeepSpeed averages the gradients
        over them. A rank whose share is empty runs one fully masked example: its forward and backward take
        part in the collectives and add exactly zero."""
        self.model.train()
        inputs = self.collate(distributed.shard(batch) or [masked(batch[0])])
        logits, targets = labelled_logits(self.model, inputs, forward=self.engine)
        loss_sum, correct = token_loss_sum(logits, targets)
        batch_tokens = max(1, sum(predicted_tokens(example) for example in batch))
        self.engine.backward(loss_sum * (distributed.world_size() / batch_tokens))
        self.engine.step()  # clips, steps the optimizer and the schedule, zeroes the gradients
        total_loss, total_correct = distributed.sum_over_ranks(float(loss_sum.detach()), float(correct))
        grad_norm = self.engine.get_global_grad_norm() or 0.0
        return StepResult(total_loss / batch_tokens, total_correct / batch_tokens, float(grad_norm))

    def learning_rate(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save_adapter(self, path: Path) -> None:
        """Rank 0 writes (the LoRA weights gathered first under ZeRO-3); every rank takes part in the gather."""
        with distributed.full_parameters(self.trainable, self.stage):
            if self.writes:
                save_adapter(self.model, path)

    def load_adapter(self, path: Path) -> None:
        """Under ZeRO-3 into the gathered LoRA weights, which rank 0's values then replace on every rank."""
        with distributed.full_parameters(self.trainable, self.stage):
            load_adapter_weights(self.model, path)

    def save(self, folder: Path, fields: dict[str, Any], rng: dict[str, Any]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(rng, checkpointing.rank_rng_file(folder, distributed.rank()))
        if self.writes:
            torch.save({**fields, "world_size": distributed.world_size()}, folder / checkpointing.STATE_FILE)
        self.engine.save_checkpoint(
            str(folder / DEEPSPEED_STATE), tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True
        )  # ends with a barrier: when rank 0 reports the folder, every rank's files are in it

    def load(self, folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        state = checkpointing.read_state_file(folder)
        saved_by = state.pop("world_size", 1)
        if saved_by != distributed.world_size() or not (folder / DEEPSPEED_STATE).is_dir():
            raise ValueError(f"this checkpoint was saved by a run on {saved_by} device(s); it resumes only on as many")
        # DeepSpeed loads its files with weights_only=False: this checkpoint's sha256 was checked first.
        load_module = _keep_module if self.stage == 3 else _load_trainable
        self.engine.load_checkpoint(
            str(folder / DEEPSPEED_STATE), tag=DEEPSPEED_TAG, load_module_strict=False, custom_load_fn=load_module
        )
        rng = torch.load(checkpointing.rank_rng_file(folder, distributed.rank()), weights_only=True)
        return state, rng
