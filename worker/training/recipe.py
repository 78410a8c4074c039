"""The QLoRA fine-tuning recipe: load the quantised base, attach LoRA, train on the loss-masked examples
(packed by default), evaluate on held-out data, save checkpoints, deliver the best (or last) adapter as
safetensors with a manifest, and compare it with the base model (`comparison`, `evaluation.json`). The device
is behind `TrainingEngine`: one process, or DeepSpeed over ranks."""

import dataclasses
import random
import shutil
import time
import traceback
from pathlib import Path

import torch

from shared.datasets.tokenization import ChatTokenizer, Encoded
from worker.training import batching, checkpointing, comparison, control, distributed
from worker.training import data as chat_data
from worker.training.checkpointing import TrainingProgress
from worker.training.config import TrainingConfig
from worker.training.deepspeed_engine import DeepSpeedEngine
from worker.training.engine import Collate, LocalEngine, TrainingEngine, steps_in_run
from worker.training.evaluation import BestValidation, validation_metrics
from worker.training.manifest import peak_memory, write_manifest
from worker.training.model import attach_lora, compute_dtype, device, load_base_model
from worker.training.packed_attention import per_sequence_attention
from worker.training.reporter import Reporter


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
    train_set, valid_set = job_examples(config, tokenizer)
    reporter.event(
        "message",
        message=f"{len(train_set)} training and {len(valid_set)} validation examples; computing in "
        f"{str(compute_dtype()).removeprefix('torch.')} on {device()}",
    )
    config = config.model_copy(update={"gradient_checkpointing": memory_plan(config, train_set, reporter)})
    model = lora_model(config)
    collate = chat_data.Collator.for_tokenizer(tokenizer, config.packing, model.device, per_sequence_attention(model))
    engine = build_engine(config, model, collate, steps_in_run(len(train_set), config.batch_size, config.n_epochs))
    loop = TrainingLoop(config, engine, collate, train_set, valid_set, reporter, out)
    if config.resume_from is not None:
        loop.load_state(config.resume_from)
        reporter.event("message", message=f"Resumed at step {loop.global_step} (epoch {loop.progress.epoch})")
    try:
        loop.run()
    except Paused as paused:
        reporter.event("paused", step=paused.step, path=str(out / "resume"), metrics=loop.checkpoint_metrics())
        distributed.close()
        raise
    adapter_dir = out / "adapter"
    metrics = loop.final_metrics(loop.deliver(adapter_dir))
    if engine.writes:
        write_manifest(adapter_dir, config, metrics, len(train_set), tokenizer.fingerprint())
    evaluation = loop.compare_with_base(tokenizer, adapter_dir, metrics)
    evaluation_file = comparison.write_evaluation(out, evaluation) if engine.writes else None
    reporter.event("message", message=comparison.summary(evaluation))
    reporter.event(
        "done",
        adapter=str(adapter_dir),
        trained_tokens=loop.progress.trained_tokens,
        metrics=metrics,
        evaluation=str(evaluation_file) if evaluation_file else None,
    )
    distributed.close()
    return metrics


def job_examples(config: TrainingConfig, tokenizer: ChatTokenizer) -> tuple[list[Encoded], list[Encoded]]:
    """The job's training and validation examples: its validation file, or the share of the training file held
    out by its seed."""
    return chat_data.load_examples(
        tokenizer,
        config.train_file,
        config.validation_file,
        max_seq_length=config.max_seq_length,
        seed=config.seed,
        train_on_inputs=config.train_on_inputs,
    )


def lora_model(config: TrainingConfig):
    # ZeRO-3 partitions parameters, 4-bit ones included: PEFT's DeepSpeed guide stores them in the compute dtype.
    zero3 = distributed.active() and config.deepspeed_stage == 3
    model = load_base_model(config.base_model_path, config.quantization, quant_storage_compute=zero3)
    model = attach_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    if config.gradient_checkpointing is True:  # each layer's input kept, the rest recomputed in the backward
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


class DoesNotFit(Exception):
    """The job's estimated peak memory is more than its device holds; `param` is the option to change."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def memory_plan(config: TrainingConfig, train_set: list[Encoded], reporter: Reporter) -> bool:
    """Whether to checkpoint, from the job's estimated peak memory on this process's device (`shared.jobs.memory`,
    as the job's validation estimated it on the largest slot): "auto" turns it on only when the job would not
    fit without it. A job that cannot fit at all fails here, naming the option to change, where the device's
    size is fixed (a GPU, or TUNEQUEUE_SLOT_MEMORY_MB); on a CPU, whose free memory moves with whatever else
    runs, it is a warning."""
    import json

    from shared.jobs import memory

    budget, fixed = device_memory()
    shape = memory.ModelShape.of(json.loads((config.base_model_path / "config.json").read_text()))
    slot = memory.Slot(budget, device(), compute_dtype().itemsize)
    longest = max((len(example.input_ids) for example in train_set), default=0)
    report, refusal = memory.plan(shape, config.model_dump(mode="json"), longest, slot)
    checkpointing = bool(report["gradient_checkpointing"])
    if refusal is not None and fixed:
        raise DoesNotFit(*refusal)
    level = "warn" if refusal is not None else "info"
    reporter.event(
        "message",
        level=level,
        message=f"Peak memory estimate: {report['estimated_peak_mib']} MiB of {report['device_mib']} MiB "
        f"({'with' if checkpointing else 'without'} gradient checkpointing"
        f"{', chosen to fit' if checkpointing and config.gradient_checkpointing == 'auto' else ''})"
        + (f". {refusal[0]}" if refusal is not None else ""),
    )
    return checkpointing


def device_memory() -> tuple[int, bool]:
    """(bytes this process may use, whether that is fixed): TUNEQUEUE_SLOT_MEMORY_MB where set, a GPU's memory,
    or on a CPU what the kernel can still give (with what this process holds already), shared by the ranks."""
    from shared.settings import get_settings

    configured = get_settings().slot_memory_mb
    if configured:
        return configured * 2**20, True
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory, True
    import os

    from worker.training.comparison import available_memory

    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return (available_memory() + resident_bytes()) // max(ranks, 1), False


def resident_bytes() -> int:
    """This process's resident memory now (VmRSS); 0 where /proc does not say."""
    from shared.proc import kib_field

    return kib_field("/proc/self/status", "VmRSS")


def build_engine(config: TrainingConfig, model, collate: Collate, total_steps: int) -> TrainingEngine:
    if distributed.active():
        return DeepSpeedEngine(model, config, collate, total_steps)
    return LocalEngine(model, config, collate, total_steps)


class Paused(Exception):
    """Raised after the state is saved; the process then exits with PAUSED_EXIT_CODE."""

    def __init__(self, step: int):
        super().__init__(f"paused at step {step}")
        self.step = step


from worker.training.process import PAUSED_EXIT_CODE  # noqa: E402, F401 (the code its Paused docstring names)


def interval(total_steps: int, count: int) -> int:
    """Steps between `count` evenly spaced events over a run (0: none)."""
    return max(1, total_steps // count) if count else 0


class TrainingLoop:
    """Steps through the epochs from wherever `progress` stands: validation at its intervals, checkpoints
    and pauses between steps, once the data position has moved on (a resume starts at the next batch)."""

    def __init__(self, config: TrainingConfig, engine: TrainingEngine, collate: Collate, train_set: list[Encoded],
                 valid_set: list[Encoded], reporter: Reporter, out: Path):  # fmt: skip
        self.config, self.engine, self.collate, self.reporter, self.out = config, engine, collate, reporter, out
        self.train_set, self.valid_set = train_set, valid_set
        self.total_steps = steps_in_run(len(train_set), config.batch_size, config.n_epochs)
        self.checkpoint_every = config.checkpoint_every_steps or interval(self.total_steps, config.n_checkpoints)
        self.eval_every = interval(self.total_steps, config.n_evals) if valid_set else 0
        self.progress = TrainingProgress()
        self.validation = BestValidation()
        self.last: dict = {}
        self.stopped_early = False
        self.started = self.last_checkpoint = time.monotonic()

    @property
    def global_step(self) -> int:
        return self.progress.global_step

    @property
    def finished(self) -> bool:
        return self.global_step >= self.total_steps or self.stopped_early

    def run(self) -> None:
        if self.valid_set and not self.progress.initial:
            self.evaluate_base_model()
        for epoch in range(self.progress.epoch, self.config.n_epochs + 1):
            self.progress.epoch = epoch
            epoch_batches = batching.batches(
                self.train_set, self.config.batch_size, self.config.seed, epoch, self.config.group_by_length
            )
            for index in range(self.progress.batch_index, len(epoch_batches)):
                self.step(epoch_batches[index], epoch)
                self.progress.batch_index = index + 1
                if self.stopped_early:
                    return
                checkpoint_now, pause_now = self.decide()
                if checkpoint_now:
                    self.checkpoint()
                if pause_now:
                    self.save_state(self.out / "resume")
                    raise Paused(self.global_step)
            self.progress.batch_index = 0

    def step(self, batch: list[Encoded], epoch: int) -> None:
        step_started = time.monotonic()
        learning_rate = self.engine.learning_rate()
        result = self.engine.step(batch)
        self.progress.global_step += 1
        tokens = sum(len(example.input_ids) for example in batch)
        self.progress.trained_tokens += tokens
        self.last = {
            "step": self.global_step,
            "total_steps": self.total_steps,
            "epoch": epoch,
            "train_loss": result.loss,
            "train_mean_token_accuracy": result.token_accuracy,
            "learning_rate": learning_rate,
            "grad_norm": result.grad_norm,
            "tokens_per_second": tokens / max(time.monotonic() - step_started, 1e-9),
            "trained_tokens": self.progress.trained_tokens,
            "progress": self.global_step / self.total_steps,
            "eta_seconds": self.eta(),
        }
        at_interval = self.eval_every and self.global_step % self.eval_every == 0
        if self.valid_set and (at_interval or self.global_step == self.total_steps):
            self.evaluate_and_track()
        if self.global_step % self.config.log_every_steps == 0 or self.global_step == self.total_steps:
            self.reporter.log(self.global_step, self.last)

    def eta(self) -> float:
        elapsed = time.monotonic() - self.started
        return elapsed / self.global_step * (self.total_steps - self.global_step)

    def evaluate(self) -> dict:
        return validation_metrics(self.engine.model, self.valid_set, self.config.batch_size, self.collate)

    def evaluate_base_model(self) -> None:
        """The base model's score, so that "better" has a reference."""
        self.progress.initial = self.evaluate()
        self.reporter.event(
            "message",
            message=f"Before training: valid_loss={self.progress.initial['valid_loss']:.4f}, "
            f"valid_mean_token_accuracy={self.progress.initial['valid_mean_token_accuracy']:.4f}",
        )

    def evaluate_and_track(self) -> None:
        metrics = self.evaluate()
        self.last.update(metrics, valid_step=self.global_step)
        if self.validation.record(self.global_step, metrics):
            if self.config.adapter_selection == "best":
                self.engine.save_adapter(self.out / checkpointing.BEST)
            return
        patience = self.config.early_stopping_patience
        if self.validation.patience_exhausted(patience):
            self.stopped_early = True
            self.reporter.event(
                "message",
                message=f"Early stopping at step {self.global_step}: valid_loss has not improved for "
                f"{patience} evaluation(s) since step {self.validation.best_step}",
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
        checkpointing.clear_stale_folder(path, self.engine)
        self.save_state(path)
        self.last_checkpoint = time.monotonic()
        self.reporter.event("checkpoint", step=self.global_step, path=str(path), metrics=self.checkpoint_metrics())

    def save_state(self, folder: Path) -> None:
        self.progress.elapsed_before = time.monotonic() - self.started
        fields = {**dataclasses.asdict(self.progress), **dataclasses.asdict(self.validation)}
        checkpointing.save_state(folder, self.engine, fields, self.out / checkpointing.BEST)

    def load_state(self, folder: Path) -> None:
        fields = checkpointing.load_state(folder, self.engine, self.out / checkpointing.BEST)
        self.progress = TrainingProgress(**{f.name: fields[f.name] for f in dataclasses.fields(TrainingProgress)})
        self.validation = BestValidation(fields["best"], fields["evals_without_improvement"])
        self.started = time.monotonic() - self.progress.elapsed_before

    def checkpoint_metrics(self) -> dict:
        keys = ("train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy")
        return {k: self.last[k] for k in keys if k in self.last and self.is_fresh(k)}

    def is_fresh(self, key: str) -> bool:
        return not key.startswith("valid") or self.last.get("valid_step") == self.global_step

    def deliver(self, adapter_dir: Path) -> dict:
        """Put the chosen adapter in `adapter_dir`; returns which one it is."""
        best = self.validation.best
        if self.config.adapter_selection == "best" and best is not None:
            if self.engine.writes:  # the ranks share this folder: one writer
                if adapter_dir.exists():
                    shutil.rmtree(adapter_dir)
                shutil.copytree(self.out / checkpointing.BEST, adapter_dir)
            return {"selection": "best", **best}
        self.engine.save_adapter(adapter_dir)
        return {"selection": "last", "step": self.global_step}

    def compare_with_base(self, tokenizer: ChatTokenizer, adapter_dir: Path, metrics: dict) -> dict:
        """The evaluation the job ends with (`comparison`): the base model's validation before the first step
        against the delivered adapter's, and both models' answers to the first validation prompts."""
        adapter = metrics["adapter"]
        delivered = adapter if adapter["selection"] == "best" else metrics
        samples, notes = self.sample_answers(tokenizer, adapter_dir, adapter["step"])
        initial = self.progress.initial
        return comparison.build_evaluation(
            initial, delivered, adapter, len(self.valid_set), samples, base_beaten=metrics.get("base_beaten"), **notes
        )

    def sample_answers(self, tokenizer: ChatTokenizer, adapter_dir: Path, adapter_step: int) -> tuple[list, dict]:
        """(samples, notes). Answers that cannot be had (a prompt the template refuses, no memory left) are
        reported and left out: the adapter is trained and delivered by then, and the job succeeds without them."""
        count, max_new_tokens = self.config.evaluation_prompts, self.config.evaluation_max_new_tokens
        if not self.valid_set or not count:
            return [], {}
        started = time.monotonic()
        try:
            kind, records = comparison.validation_records(
                self.config.train_file, self.config.validation_file, self.config.seed
            )
            prompts = comparison.sample_prompts(tokenizer, kind, records, count, self.config.max_seq_length)
            if adapter_step != self.global_step:  # the best adapter, from an earlier step: its weights, not the last
                distributed.barrier()  # rank 0 has put it in place
                self.engine.load_adapter(adapter_dir)
            samples = comparison.side_by_side(
                self.engine.model, tokenizer, prompts, max_new_tokens, synced=distributed.active()
            )
        except Exception as exc:
            traceback.print_exc()
            reason = f"{type(exc).__name__}: {exc}"
            self.reporter.event("message", message=f"Evaluation: no sample answers ({reason})")
            return [], {"samples_error": reason}
        return samples, {"max_new_tokens": max_new_tokens, "seconds": round(time.monotonic() - started, 2)}

    def final_metrics(self, chosen: dict) -> dict:
        """The run's figures. The validation ones are the delivered adapter's, taken at its step (`valid_step`):
        with `adapter_selection: best` that is the best evaluation, not necessarily the last one, which is kept
        beside them as `last_evaluation`."""
        metrics = {
            "step": self.global_step,
            "train_loss": self.last.get("train_loss"),
            "train_mean_token_accuracy": self.last.get("train_mean_token_accuracy"),
            "trained_tokens": self.progress.trained_tokens,
            "wall_seconds": round(time.monotonic() - self.started, 2),
            "stopped_early": self.stopped_early,
            "adapter": chosen,
            **peak_memory(),
        }
        if self.valid_set:
            keys = ("valid_loss", "valid_mean_token_accuracy")
            if chosen["selection"] == "last":
                chosen.update({k: self.last[k] for k in keys})
            delivered = {k: chosen[k] for k in keys}
            metrics.update(delivered, valid_step=chosen["step"])
            metrics.update({f"full_{k}": v for k, v in delivered.items()})
            metrics["last_evaluation"] = {"step": self.last.get("valid_step"), **{k: self.last[k] for k in keys}}
            metrics.update({f"initial_{k}": v for k, v in self.progress.initial.items()})
            metrics["base_beaten"] = self.base_beaten()
        return metrics

    def base_beaten(self) -> bool | None:
        """Whether any evaluation of the run scored a lower loss than the base model before the first step (None
        where either is missing). When none did, the job says so at the `warn` level: whatever adapter is
        delivered, not training would have done at least as well on the validation set."""
        best, initial = self.validation.best, self.progress.initial
        if best is None or not initial:
            return None
        beaten = best["valid_loss"] < initial["valid_loss"]
        if not beaten:
            self.reporter.event(
                "message",
                level="warn",
                message=f"No evaluation beat the base model: the best valid_loss, {best['valid_loss']:.4f} at step "
                f"{best['step']}, is not below the base model's {initial['valid_loss']:.4f} before training, so "
                "the adapter is no better than the base on the validation set. Try a lower learning rate "
                "(learning_rate_multiplier), fewer epochs, or more (or more varied) training data.",
            )
        return beaten
