"""One job on two processes (torchrun + DeepSpeed on CPU with gloo): ZeRO-2 and ZeRO-3 follow the loss curve
of the one-process run of the same job (same global batch), and rank 0 delivers a loadable adapter."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.support import ROOT, free_port
from tests.unit.test_recipe import metrics_of, parrot, run_recipe
from worker.training.reporter import parse_line

pytest.importorskip("deepspeed")


def torchrun(tmp_path, config: dict, name: str, processes: int = 2) -> list[str]:
    """The command the worker runs for a job on `processes` devices (run with DS_ACCELERATOR=cpu here)."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_port", str(free_port()), "-m", "worker.training", "--config", str(path),
        "--out", str(tmp_path / name),
    ]  # fmt: skip


def run_distributed(tmp_path, config: dict, name: str, processes: int = 2) -> tuple[int, list[dict], float]:
    started = time.monotonic()
    result = subprocess.run(
        torchrun(tmp_path, config, name, processes),
        capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )  # fmt: skip
    events = [e for e in map(parse_line, result.stdout.splitlines()) if e]
    assert events, result.stderr[-3000:]
    return result.returncode, events, time.monotonic() - started


def tiny_job(tmp_path, tiny_model, **overrides) -> dict:
    """10 steps of batch 8: big enough to split over two ranks, small enough to run several times."""
    return {
        "base_model_path": str(tiny_model),
        "train_file": str(parrot(tmp_path, n=40)),
        "n_epochs": 2,
        "batch_size": 8,
        "learning_rate": 5e-3,
        "n_checkpoints": 0,
        "seed": 3,
        "dataset_sha256": "abc",
        "packing": False,
        **overrides,
    }


@pytest.mark.timeout(900)
def test_two_processes_follow_the_one_process_loss_curve(tmp_path, tiny_model):
    config = tiny_job(tmp_path, tiny_model)
    started = time.monotonic()
    code, single = run_recipe(tmp_path, config, "one")
    one_seconds = time.monotonic() - started
    assert code == 0, single
    curves = {"1 process": [m["train_loss"] for m in metrics_of(single)]}
    walls = {"1 process": one_seconds}
    for stage in (2, 3):
        code, events, seconds = run_distributed(tmp_path, {**config, "deepspeed_stage": stage}, f"zero{stage}")
        assert code == 0, events
        curve = [m["train_loss"] for m in metrics_of(events)]
        assert len(curve) == len(curves["1 process"])
        # Same data, same global batch, same schedule: the curves agree closely (bf16, and each rank's loss is
        # the mean over its own half of the batch, so not to the last digit).
        gaps = [abs(a - b) for a, b in zip(curve, curves["1 process"], strict=True)]
        assert max(gaps) < 0.15, (stage, curve, curves["1 process"])
        assert curve[-1] < curve[0] - 0.1  # and it learns
        adapter = tmp_path / f"zero{stage}" / "adapter"
        assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "manifest.json").is_file()
        curves[f"ZeRO-{stage}, 2 processes"], walls[f"ZeRO-{stage}, 2 processes"] = curve, seconds
    print("\n" + "\n".join(f"{k}: wall {walls[k]:.1f} s, losses {[round(x, 3) for x in v]}" for k, v in curves.items()))
