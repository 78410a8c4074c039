"""One job on several processes (torchrun + DeepSpeed on CPU with gloo): ZeRO-2 and ZeRO-3 on 2 and 3
processes follow the loss curve of the one-process run of the same job (same global batch) to the compute
dtype's rounding, even where the ranks hold different numbers of tokens, and rank 0 delivers the adapter the
one-process run would."""

import json
import math
import os
import subprocess
import sys
import time

import pytest

from tests.support import ROOT, chat, free_port, write_jsonl
from tests.unit.test_recipe import metrics_of, parrot, run_recipe
from worker.training.reporter import parse_line

pytest.importorskip("deepspeed")


# DeepSpeed on CPU; under ZeRO-3 every parameter partitioned, however small (the tiny model's LoRA matrices
# would otherwise stay whole on every rank), so that saving the adapter really depends on the gather.
DISTRIBUTED_ENV = {"DS_ACCELERATOR": "cpu", "TUNEQUEUE_ZERO3_PERSISTENCE_THRESHOLD": "0"}


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
    extensions = tmp_path / f"{name}-torch-extensions"
    result = subprocess.run(
        torchrun(tmp_path, config, name, processes),
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, **DISTRIBUTED_ENV, "TORCH_EXTENSIONS_DIR": str(extensions)},
    )  # fmt: skip
    # DeepSpeed's shared-memory op (inference only) is never compiled: a minute on a CPU node's first launch.
    assert not extensions.exists() or not any(extensions.iterdir()), sorted(extensions.rglob("*"))[:10]
    events = [e for e in map(parse_line, result.stdout.splitlines()) if e]
    assert events, result.stderr[-3000:]
    if result.returncode != 0:  # shown with the failure: every rank's stderr says why
        print(result.stderr[-8000:])
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


def adapter_tensors(folder) -> dict:
    from safetensors.torch import load_file

    return {name: tensor.float() for name, tensor in load_file(folder / "adapter_model.safetensors").items()}


def assert_same_adapter(adapter, reference, min_cosine: float = 0.8) -> None:
    """Every LoRA tensor of `adapter` (gathered from the ranks) has the reference run's shape and points the same
    way: a gather that saved empty, partitioned or untrained tensors fails here, not only a missing file."""
    import torch

    got, want = adapter_tensors(adapter), adapter_tensors(reference)
    assert got.keys() == want.keys() and got, (sorted(got), sorted(want))
    for name, tensor in want.items():
        assert got[name].shape == tensor.shape, (name, got[name].shape, tensor.shape)
        if "lora_B" in name:  # B starts at zero: trained, it is not
            assert got[name].abs().max() > 0, name
        # Dropout masks fall differently when the batch is split over ranks, and Adam magnifies small
        # differences in the tiny B matrices: the direction agrees (cosine 0.89-0.99 measured), not every digit.
        cosine = float(torch.nn.functional.cosine_similarity(got[name].flatten(), tensor.flatten(), dim=0))
        assert cosine > min_cosine, (name, cosine)


def loss_tolerance() -> float:
    """How far two runs of the same steps may drift apart by rounding and dropout alone (bf16: 0.003 measured;
    float32 on an AVX2 CPU: 0.0078 on a loss of 10.4, two processes against one with an uneven last batch)."""
    import torch

    from worker.training.model import compute_dtype

    return 0.01 if compute_dtype() == torch.float32 else 0.02


# (devices, ZeRO stage, training examples, batch size, packing): each epoch ends on a batch with fewer examples
# than devices (9 % 4 = 1 on 2 devices; 13 % 4 = 1 and 14 % 4 = 2 on 3), and on 3 devices every full batch of 4
# splits 2 / 1 / 1, so ranks hold different numbers of tokens at every step.
UNEVEN = [(2, 2, 9, 4, True), (3, 3, 13, 4, False), (3, 2, 14, 4, True)]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("devices,stage,examples,batch_size,packing", UNEVEN)
def test_uneven_last_batch_follows_the_one_process_curve(
    tmp_path, tiny_model, devices, stage, examples, batch_size, packing
):
    # Answers of 2 to 60 words: the ranks' shares of a batch hold very different numbers of loss tokens.
    answers = [" ".join(["squawk"] * (2 + 29 * (i % 3))) for i in range(examples)]
    data = write_jsonl(tmp_path / "uneven.jsonl", [chat(f"Say {i}", answer) for i, answer in enumerate(answers)])
    config = tiny_job(tmp_path, tiny_model, train_file=str(data), batch_size=batch_size, packing=packing)
    code, single = run_recipe(tmp_path, config, "one")
    assert code == 0, single
    code, events, _ = run_distributed(tmp_path, {**config, "deepspeed_stage": stage}, "many", devices)
    assert code == 0, [e for e in events if e["event"] in ("error", "message")]
    want = [m["train_loss"] for m in metrics_of(single)]
    got = [m["train_loss"] for m in metrics_of(events)]
    assert len(got) == len(want) == 2 * math.ceil(examples / batch_size)
    # Every loss is the batch's token mean, whichever rank held which tokens: the curves differ only by the
    # compute dtype's rounding, a step with one or two examples included.
    gaps = [abs(a - b) for a, b in zip(got, want, strict=True)]
    assert max(gaps) < loss_tolerance(), (got, want)
    # The first step's gradient, before any update could blur it: weighting each rank's mean equally instead
    # of every token (20% off here) or dropping a rank's share shows in its norm (0.03% apart measured).
    norms = [metrics_of(run)[0]["grad_norm"] for run in (events, single)]
    assert abs(norms[0] - norms[1]) < 0.02 * norms[1], norms
    assert got[-1] < got[0] - 0.1  # and it learns
    # Rank 0 delivers the adapter, gathered from every rank (under ZeRO-3 each holds a part of every tensor).
    assert (tmp_path / "many" / "adapter" / "manifest.json").is_file()
    assert_same_adapter(tmp_path / "many" / "adapter", tmp_path / "one" / "adapter")
