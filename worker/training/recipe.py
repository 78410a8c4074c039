"""The QLoRA fine-tuning recipe: load the quantised base, attach LoRA, train on the loss-masked examples
(packed by default), evaluate on held-out data, save checkpoints, and deliver the best (or last) adapter as
safetensors with a manifest."""

import dataclasses
import json
import math
import platform
import random
import shutil
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from shared.datasets.tokenization import ChatTokenizer, Encoded
from worker.training import control, distributed
from worker.training import data as chat_data
from worker.training.config import TrainingConfig
from worker.training.model import attach_lora, compute_dtype, device, load_base_model
from worker.training.reporter import Reporter

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "tokenizers", "tunequeue")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train(config: TrainingConfig, out: Path, reporter: Reporter) -> dict:
    if distributed.active():
        distributed.init()
        if distributed.rank() != 0:
            reporter = distributed.SilentReporter()
    seed_everything(config.seed)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = ChatTokenizer(config.base_model_path)
    train_set, valid_set = chat_data.load_examples(
        tokenizer,
        config.train_file,
        config.validation_file,
        max_seq_length=config.max_seq_length,
        seed=config.seed,
        train_on_inputs=config.train_on_inputs,
    )
    reporter.event(
        "message",
        message=f"{len(train_set)} training and {len(valid_set)} validation examples; computing in "
        f"{str(compute_dtype()).removeprefix('torch.')} on {device()}",
    )
    # ZeRO-3 partitions parameters, 4-bit ones included: PEFT's DeepSpeed guide stores them in the compute dtype.
    zero3 = distributed.active() and config.deepspeed_stage == 3
    model = load_base_model(config.base_model_path, config.quantization, quant_storage_compute=zero3)
    model = attach_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    loop = TrainingLoop(config, model, tokenizer, train_set, valid_set, reporter, out)
    if config.resume_from is not None:
        loop.load_state(config.resume_from)
        reporter.event("message", message=f"Resumed at step {loop.global_step} (epoch {loop.epoch})")
    try:
        loop.run()
    except Paused as paused:
        reporter.event("paused", step=paused.step, path=str(out / "resume"), metrics=loop.checkpoint_metrics())
        distributed.close()
        raise
    adapter_dir = out / "adapter"
    chosen = loop.deliver(adapter_dir)
    metrics = loop.final_metrics(chosen)
    if distributed.rank() == 0:
        write_manifest(adapter_dir, config, metrics, len(train_set), tokenizer.fingerprint())
    reporter.event("done", adapter=str(adapter_dir), trained_tokens=loop.trained_tokens, metrics=metrics)
    distributed.close()
    return metrics


RESUMED_FIELDS = (
    "global_step",
    "trained_tokens",
    "epoch",
    "batch_index",
    "best",
    "evals_without_improvement",
    "initial",
    "elapsed_before",
)


DEEPSPEED_STATE = "deepspeed"


def _load_trainable(src: dict, dst) -> None:
    """The module half of a DeepSpeed checkpoint holds the trainable (LoRA) weights, not the frozen 4-bit base
    (never saved). Under ZeRO-3 they are partitioned and come back from each rank's fp32 master shard instead."""
    trainable = {name for name, param in dst.named_parameters() if param.requires_grad}
    dst.load_state_dict({name: value for name, value in src.items() if name in trainable}, strict=False)


def _keep_module(src: dict, dst) -> None:
    """ZeRO-3: nothing to load into the module here (see `_load_trainable`)."""


class Paused(Exception):
    """Raised after the state is saved; the process then exits with PAUSED_EXIT_CODE."""

    def __init__(self, step: int):
        super().__init__(f"paused at step {step}")
        self.step = step


PAUSED_EXIT_CODE = 3


def interval(total_steps: int, count: int) -> int:
    """Steps between `count` evenly spaced events over a run (0: none)."""
    return max(1, total_steps // count) if count else 0


class TrainingLoop:
    def __init__(self, config, model, tokenizer, train_set, valid_set, reporter, out):
        self.config, self.model, self.reporter, self.out = config, model, reporter, out
        self.train_set: list[Encoded] = train_set
        self.valid_set: list[Encoded] = valid_set
        self.pad_id = tokenizer.pad_id
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.trainable = trainable
        self.optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.total_steps = math.ceil(len(train_set) / config.batch_size) * config.n_epochs
        warmup = round(config.warmup_ratio * self.total_steps)
        self.scheduler = lr_schedule(self.optimizer, config.lr_scheduler, warmup, self.total_steps)
        self.checkpoint_every = config.checkpoint_every_steps or interval(self.total_steps, config.n_checkpoints)
        self.engine = None
        if distributed.active():
            micro_batch = max(1, config.batch_size // distributed.world_size())
            self.engine, self.optimizer, self.scheduler = distributed.wrap(
                model, self.optimizer, self.scheduler, trainable, config.deepspeed_stage, micro_batch,
                config.max_grad_norm,
            )  # fmt: skip
        self.eval_every = interval(self.total_steps, config.n_evals) if valid_set else 0
        self.global_step = 0
        self.trained_tokens = 0
        self.started = time.monotonic()
        self.last: dict = {}
        self.best: dict | None = None
        self.evals_without_improvement = 0
        self.stopped_early = False
        self.initial: dict = {}
        self.epoch, self.batch_index = 1, 0
        self.elapsed_before = 0.0
        self.last_checkpoint = time.monotonic()

    def run(self) -> None:
        if self.valid_set and not self.initial:  # the base model's score, so that "better" has a reference
            self.initial = self.evaluate()
            self.reporter.event(
                "message",
                message=f"Before training: valid_loss={self.initial['valid_loss']:.4f}, "
                f"valid_mean_token_accuracy={self.initial['valid_mean_token_accuracy']:.4f}",
            )
        for epoch in range(self.epoch, self.config.n_epochs + 1):
            self.epoch = epoch
            epoch_batches = chat_data.batches(self.train_set, self.config.batch_size, self.config.seed, epoch)
            for index in range(self.batch_index, len(epoch_batches)):
                self.step(epoch_batches[index], epoch)
                self.batch_index = index + 1
                if self.stopped_early:
                    return
                # After the data position moved on: a resume starts at the next batch.
                checkpoint_now, pause_now = self.decide()
                if checkpoint_now:
                    self.checkpoint()
                if pause_now:
                    self.save_state(self.out / "resume")
                    raise Paused(self.global_step)
            self.batch_index = 0

    def save_state(self, folder: Path) -> None:
        """Everything needed to continue exactly here: adapter, optimizer, schedule, RNG, data position.
        On several ranks every rank saves its own ZeRO shard of the optimizer (and its RNG) into the folder."""
        self.elapsed_before = time.monotonic() - self.started
        self.save_adapter(folder / "adapter")
        state = {name: getattr(self, name) for name in RESUMED_FIELDS}
        rng = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
        if distributed.rank() == 0:
            if (self.out / "best").exists():
                shutil.copytree(self.out / "best", folder / "best", dirs_exist_ok=True)
        if self.engine is None:
            state.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(), **rng)
            torch.save(state, folder / "state.pt")
            return
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(rng, folder / f"rng-rank-{distributed.rank()}.pt")
        if distributed.rank() == 0:
            torch.save({**state, "world_size": distributed.world_size()}, folder / "state.pt")
        # Optimizer shards, fp32 master weights and the schedule; the frozen 4-bit base is not saved.
        self.engine.save_checkpoint(
            str(folder / DEEPSPEED_STATE), tag="state", save_latest=False, exclude_frozen_parameters=True
        )  # ends with a barrier: when rank 0 reports the folder, every rank's files are in it

    def load_state(self, folder: Path) -> None:
        # weights_only: tensors and plain values, no pickled code, even from our own verified checkpoint
        state = torch.load(folder / "state.pt", weights_only=True)
        if self.engine is None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(self.model, load_file(folder / "adapter" / "adapter_model.safetensors"))
            self.optimizer.load_state_dict(state.pop("optimizer"))
            self.scheduler.load_state_dict(state.pop("scheduler"))
            rng = state
        else:
            saved_by = state.pop("world_size", 1)
            if saved_by != distributed.world_size() or not (folder / DEEPSPEED_STATE).is_dir():
                raise ValueError(
                    f"this checkpoint was saved by a run on {saved_by} device(s); it resumes only on as many"
                )
            # DeepSpeed loads its files with weights_only=False: this checkpoint's sha256 was checked first.
            load_module = _keep_module if self.config.deepspeed_stage == 3 else _load_trainable
            self.engine.load_checkpoint(
                str(folder / DEEPSPEED_STATE), tag="state", load_module_strict=False, custom_load_fn=load_module
            )
            rng = torch.load(folder / f"rng-rank-{distributed.rank()}.pt", weights_only=True)
        torch.set_rng_state(rng.pop("torch_rng"))
        random.setstate(rng.pop("python_rng"))
        for name in RESUMED_FIELDS:
            setattr(self, name, state[name])
        if (folder / "best").exists() and distributed.rank() == 0:
            shutil.copytree(folder / "best", self.out / "best", dirs_exist_ok=True)
        distributed.barrier()
        self.started = time.monotonic() - self.elapsed_before

    def inputs(self, batch: list[Encoded]) -> dict:
        if self.config.packing:
            # Rows as long as the longest example: attention cost grows with the square of the row length,
            # so longer rows would trade the padding saved for attention over tokens that are masked anyway.
            longest = max(len(example.input_ids) for example in batch)
            tensors = chat_data.collate_packed(batch, self.pad_id, longest)
        else:
            tensors = chat_data.collate(batch, self.pad_id)
        return {k: v.to(self.model.device) for k, v in tensors.items()}

    def step(self, batch: list[Encoded], epoch: int) -> None:
        step_started = time.monotonic()
        self.model.train()
        learning_rate = self.scheduler.get_last_lr()[0]
        if self.engine is not None:
            loss, accuracy = self.sharded_step(batch)
            grad_norm = self.engine.get_global_grad_norm() or 0.0
        else:
            inputs = self.inputs(batch)
            output = self.model(**inputs, use_cache=False)  # a cache would defeat packing's block mask
            output.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            loss = float(output.loss.item())
            accuracy = token_accuracy(output.logits, inputs["labels"])
        self.global_step += 1
        tokens = sum(len(example.input_ids) for example in batch)
        self.trained_tokens += tokens
        # .item() is a device sync point; once per step is fine at these step times.
        self.last = {
            "step": self.global_step,
            "total_steps": self.total_steps,
            "epoch": epoch,
            "train_loss": loss,
            "train_mean_token_accuracy": accuracy,
            "learning_rate": learning_rate,
            "grad_norm": float(grad_norm),
            "tokens_per_second": tokens / max(time.monotonic() - step_started, 1e-9),
            "trained_tokens": self.trained_tokens,
            "progress": self.global_step / self.total_steps,
            "eta_seconds": self._eta(),
        }
        at_interval = self.eval_every and self.global_step % self.eval_every == 0
        if self.valid_set and (at_interval or self.global_step == self.total_steps):
            self.evaluate_and_track()
        if self.global_step % self.config.log_every_steps == 0 or self.global_step == self.total_steps:
            self.reporter.log(self.global_step, self.last)

    def sharded_step(self, batch: list[Encoded]) -> tuple[float, float]:
        """One optimizer step on several ranks, each on its share of the batch. The loss is the batch's mean
        over its loss tokens, as on one process: each rank backpropagates the sum over its own tokens divided
        by the batch's token count (every rank holds the whole batch, so it knows that count without asking),
        times the number of ranks, since DeepSpeed averages the gradients over them. A rank whose share is
        empty runs one fully masked example: its forward and backward take part in the collectives and add
        exactly zero. Returns the batch's (loss, token accuracy)."""
        share = distributed.shard(batch) or [masked(batch[0])]
        inputs = self.inputs(share)
        labels = inputs.pop("labels")
        output = self.engine(**inputs, use_cache=False)
        loss_sum, correct = token_loss_sum(output.logits, labels)
        batch_tokens = max(1, sum(predicted_tokens(example) for example in batch))
        self.engine.backward(loss_sum * (distributed.world_size() / batch_tokens))
        self.engine.step()  # clips, steps the optimizer and the schedule, zeroes the gradients
        total_loss, total_correct = distributed.sum_over_ranks(float(loss_sum.detach()), float(correct))
        return total_loss / batch_tokens, total_correct / batch_tokens

    @property
    def finished(self) -> bool:
        return self.global_step >= self.total_steps or self.stopped_early

    def _eta(self) -> float:
        elapsed = time.monotonic() - self.started
        return elapsed / self.global_step * (self.total_steps - self.global_step)

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        loss_sum, correct, tokens = 0.0, 0, 0
        for start in range(0, len(self.valid_set), self.config.batch_size):
            inputs = self.inputs(self.valid_set[start : start + self.config.batch_size])
            logits = self.model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits
            logits = logits[:, :-1].float()
            target = inputs["labels"][:, 1:]
            mask = target != chat_data.IGNORE_INDEX
            loss_sum += float(torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum"))
            correct += int((logits.argmax(-1)[mask] == target[mask]).sum())
            tokens += int(mask.sum())
        return {"valid_loss": loss_sum / max(tokens, 1), "valid_mean_token_accuracy": correct / max(tokens, 1)}

    def evaluate_and_track(self) -> None:
        metrics = self.evaluate()
        self.last.update(metrics, valid_step=self.global_step)
        if self.best is None or metrics["valid_loss"] < self.best["valid_loss"]:
            self.best = {"step": self.global_step, **metrics}
            self.evals_without_improvement = 0
            if self.config.adapter_selection == "best":
                self.save_adapter(self.out / "best")
        else:
            self.evals_without_improvement += 1
            patience = self.config.early_stopping_patience
            if patience and self.evals_without_improvement >= patience:
                self.stopped_early = True
                self.reporter.event(
                    "message",
                    message=f"Early stopping at step {self.global_step}: valid_loss has not improved for "
                    f"{patience} evaluation(s) since step {self.best['step']}",
                )

    def decide(self) -> tuple[bool, bool]:
        """(checkpoint now, pause now), the same on every rank."""
        minutes = self.config.checkpoint_every_minutes
        timer = bool(minutes) and time.monotonic() - self.last_checkpoint >= minutes * 60
        timer, pause = distributed.any_rank(timer, control.pause_is_requested())
        if self.finished:
            return False, False
        return timer or bool(self.checkpoint_every and self.global_step % self.checkpoint_every == 0), pause

    def checkpoint(self) -> None:
        """The whole training state (adapter included), so a later attempt can continue from here."""
        path = self.out / "checkpoints" / f"step-{self.global_step}"
        if distributed.rank() == 0 and path.exists():
            shutil.rmtree(path)
        # The ranks share the folder: none writes into it before a stale one is gone (or it could delete the
        # files another rank has just written).
        distributed.barrier()
        self.save_state(path)
        self.last_checkpoint = time.monotonic()
        self.reporter.event("checkpoint", step=self.global_step, path=str(path), metrics=self.checkpoint_metrics())

    def checkpoint_metrics(self) -> dict:
        keys = ("train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy")
        return {k: self.last[k] for k in keys if k in self.last and self._fresh(k)}

    def _fresh(self, key: str) -> bool:
        return not key.startswith("valid") or self.last.get("valid_step") == self.global_step

    def deliver(self, adapter_dir: Path) -> dict:
        """Put the chosen adapter in `adapter_dir`; returns which one it is."""
        if self.config.adapter_selection == "best" and self.best is not None:
            if distributed.rank() == 0:  # the ranks share this folder: one writer
                if adapter_dir.exists():
                    shutil.rmtree(adapter_dir)
                shutil.copytree(self.out / "best", adapter_dir)
            return {"selection": "best", **self.best}
        self.save_adapter(adapter_dir)
        return {"selection": "last", "step": self.global_step}

    def save_adapter(self, path: Path) -> None:
        """Rank 0 writes (the LoRA weights gathered first under ZeRO-3); every rank takes part in the gather."""
        with distributed.full_parameters(self.trainable, self.config.deepspeed_stage):
            if distributed.rank() == 0:
                save_adapter(self.model, path)

    def final_metrics(self, chosen: dict) -> dict:
        metrics = {
            "step": self.global_step,
            "train_loss": self.last.get("train_loss"),
            "train_mean_token_accuracy": self.last.get("train_mean_token_accuracy"),
            "trained_tokens": self.trained_tokens,
            "wall_seconds": round(time.monotonic() - self.started, 2),
            "stopped_early": self.stopped_early,
            "adapter": chosen,
            **peak_memory(),
        }
        if self.valid_set:
            final = {
                "valid_loss": self.last["valid_loss"],
                "valid_mean_token_accuracy": self.last["valid_mean_token_accuracy"],
            }
            metrics.update(final)
            metrics["full_valid_loss"] = final["valid_loss"]
            metrics["full_valid_mean_token_accuracy"] = final["valid_mean_token_accuracy"]
            metrics.update({f"initial_{k}": v for k, v in self.initial.items()})
        return metrics


def peak_memory() -> dict:
    import resource

    memory = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        memory["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return memory


def predicted_tokens(example: Encoded) -> int:
    """Tokens of an example that count in the loss: its labels but the first, which nothing predicts."""
    return sum(label != chat_data.IGNORE_INDEX for label in example.labels[1:])


def masked(example: Encoded) -> Encoded:
    """The same tokens with no label: a forward and backward that contribute nothing."""
    return dataclasses.replace(example, labels=[chat_data.IGNORE_INDEX] * len(example.labels))


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The summed next-token cross-entropy over the labelled positions (a tensor to backpropagate, zero with
    a gradient when none is labelled) and how many of them the argmax gets right."""
    target = labels[:, 1:].reshape(-1)
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
    loss_sum = torch.nn.functional.cross_entropy(
        shifted.float(), target, ignore_index=chat_data.IGNORE_INDEX, reduction="sum"
    )
    with torch.no_grad():
        mask = target != chat_data.IGNORE_INDEX
        correct = int((shifted.argmax(-1)[mask] == target[mask]).sum())
    return loss_sum, correct


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        predicted = logits[:, :-1].argmax(dim=-1)
        target = labels[:, 1:]
        mask = target != chat_data.IGNORE_INDEX
        return float((predicted[mask] == target[mask]).float().mean()) if mask.any() else 0.0


def lr_schedule(optimizer, kind: str, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def save_adapter(model, path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    model.save_pretrained(path, safe_serialization=True)


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


def write_manifest(
    adapter_dir: Path, config: TrainingConfig, metrics: dict, n_examples: int, tokenizer_sha: str
) -> None:
    manifest = {
        "format": "tunequeue.adapter/1",
        "job_id": config.job_id,
        "base_model": config.base_model_id,
        "dataset": {"sha256": config.dataset_sha256, "examples": n_examples},
        "tokenizer_sha256": tokenizer_sha,
        "seed": config.seed,
        "hyperparameters": config.hyperparameters,
        "training": config.model_dump(
            mode="json", exclude={"base_model_path", "train_file", "validation_file", "hyperparameters"}
        ),
        "metrics": metrics,
        "libraries": library_versions(),
        "device": device(),
        "compute_dtype": str(compute_dtype()).removeprefix("torch."),
        "created_at": int(time.time()),
    }
    (adapter_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
