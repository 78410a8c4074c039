"""The manifest delivered beside the adapter: what it was trained from, how, with which libraries, and how
well it did."""

import json
import platform
import resource
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from worker.training.config import TrainingConfig
from worker.training.model import compute_dtype, device

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "tokenizers", "tunequeue")
FORMAT = "tunequeue.adapter/1"


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


def peak_memory() -> dict[str, float]:
    memory = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        memory["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return memory


def write_manifest(
    adapter_dir: Path, config: TrainingConfig, metrics: dict, n_examples: int, tokenizer_sha: str
) -> None:
    manifest = {
        "format": FORMAT,
        "job_id": config.job_id,
        "base_model": config.base_model_id,
        "dataset": {"sha256": config.dataset_sha256, "examples": n_examples},
        "tokenizer_sha256": tokenizer_sha,
        "seed": config.seed,
        "hyperparameters": config.hyperparameters,
        "training": config.model_dump(
            mode="json",
            exclude={"base_model_path", "train_file", "validation_file", "hyperparameters", "dataset_cache_dir"},
        ),
        "metrics": metrics,
        "libraries": library_versions(),
        "device": device(),
        "compute_dtype": str(compute_dtype()).removeprefix("torch."),
        "created_at": int(time.time()),
    }
    (adapter_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
