"""The QLoRA fine-tuning recipe: load the quantised base, attach LoRA, train on chat data with loss on the
assistant tokens, save checkpoints and the final adapter (safetensors) with a manifest."""

import json
import math
import platform
import random
import shutil
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from worker.training import data as chat_data
from worker.training.config import TrainingConfig
from worker.training.model import attach_lora, device, load_base_model, load_tokenizer
from worker.training.reporter import Reporter

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "tunequeue")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train(config: TrainingConfig, out: Path, reporter: Reporter) -> dict:
    seed_everything(config.seed)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(config.base_model_path)
    examples = chat_data.encode_file(tokenizer, config.train_file, config.max_seq_length, config.train_on_inputs)
    reporter.event("message", message=f"Loaded {len(examples)} training examples")
    model = load_base_model(config.base_model_path, config.quantization)
    model = attach_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total_steps = steps_per_epoch * config.n_epochs
    scheduler = linear_schedule(optimizer, round(config.warmup_ratio * total_steps), total_steps)
    loop = TrainingLoop(config, model, tokenizer, optimizer, scheduler, reporter, total_steps, out)
    for epoch in range(config.n_epochs):
        for batch in chat_data.batches(examples, config.batch_size, config.seed, epoch):
            loop.step(batch, epoch + 1)
    metrics = loop.final_metrics()
    adapter_dir = out / "adapter"
    save_adapter(model, adapter_dir)
    write_manifest(adapter_dir, config, metrics, len(examples))
    reporter.event("done", adapter=str(adapter_dir), trained_tokens=loop.trained_tokens, metrics=metrics)
    return metrics


class TrainingLoop:
    def __init__(self, config, model, tokenizer, optimizer, scheduler, reporter, total_steps, out):
        self.config, self.model, self.optimizer, self.scheduler = config, model, optimizer, scheduler
        self.reporter, self.total_steps, self.out = reporter, total_steps, out
        self.pad_token_id = tokenizer.pad_token_id
        self.global_step = 0
        self.trained_tokens = 0
        self.started = time.monotonic()
        self.last_metrics: dict = {}

    def step(self, batch: list, epoch: int) -> None:
        step_started = time.monotonic()
        inputs = {k: v.to(self.model.device) for k, v in chat_data.collate(batch, self.pad_token_id).items()}
        self.model.train()
        output = self.model(**inputs)
        output.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad], self.config.max_grad_norm
        )
        learning_rate = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        tokens = int(inputs["attention_mask"].sum())
        self.trained_tokens += tokens
        # .item() is a device sync point; once per step is fine at these step times.
        self.last_metrics = {
            "step": self.global_step,
            "total_steps": self.total_steps,
            "epoch": epoch,
            "train_loss": float(output.loss.item()),
            "train_mean_token_accuracy": token_accuracy(output.logits, inputs["labels"]),
            "learning_rate": learning_rate,
            "grad_norm": float(grad_norm),
            "tokens_per_second": tokens / max(time.monotonic() - step_started, 1e-9),
            "trained_tokens": self.trained_tokens,
            "progress": self.global_step / self.total_steps,
            "eta_seconds": self._eta(),
        }
        if self.global_step % self.config.log_every_steps == 0 or self.global_step == self.total_steps:
            self.reporter.log(self.global_step, self.last_metrics)
        every = self.config.checkpoint_every_steps
        if every and self.global_step % every == 0 and self.global_step < self.total_steps:
            self.checkpoint()

    def _eta(self) -> float:
        elapsed = time.monotonic() - self.started
        return elapsed / self.global_step * (self.total_steps - self.global_step)

    def checkpoint(self) -> None:
        path = self.out / "checkpoints" / f"step-{self.global_step}"
        save_adapter(self.model, path)
        metrics = {k: self.last_metrics[k] for k in ("train_loss", "train_mean_token_accuracy")}
        self.reporter.event("checkpoint", step=self.global_step, path=str(path), metrics=metrics)

    def final_metrics(self) -> dict:
        return {
            "step": self.global_step,
            "train_loss": self.last_metrics.get("train_loss"),
            "train_mean_token_accuracy": self.last_metrics.get("train_mean_token_accuracy"),
            "trained_tokens": self.trained_tokens,
            "wall_seconds": round(time.monotonic() - self.started, 2),
            **peak_memory(),
        }


def peak_memory() -> dict:
    import resource

    memory = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        memory["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return memory


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        predicted = logits[:, :-1].argmax(dim=-1)
        target = labels[:, 1:]
        mask = target != chat_data.IGNORE_INDEX
        return float((predicted[mask] == target[mask]).float().mean()) if mask.any() else 0.0


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

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


def write_manifest(adapter_dir: Path, config: TrainingConfig, metrics: dict, n_examples: int) -> None:
    manifest = {
        "format": "tunequeue.adapter/1",
        "job_id": config.job_id,
        "base_model": config.base_model_id,
        "dataset": {"sha256": config.dataset_sha256, "examples": n_examples},
        "hyperparameters": config.hyperparameters,
        "training": config.model_dump(mode="json", exclude={"base_model_path", "train_file", "hyperparameters"}),
        "metrics": metrics,
        "libraries": library_versions(),
        "device": device(),
        "created_at": int(time.time()),
    }
    (adapter_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
