"""A job on two processes checkpoints every rank's ZeRO shard: a pause (the worker's pause file; torchrun does
not pass signals on) and a periodic checkpoint both resume onto the uninterrupted run's loss curve."""

import os
import subprocess

import pytest

from tests.support import ROOT
from tests.unit.test_multidevice import assert_same_adapter, run_distributed, tiny_job, torchrun
from tests.unit.test_recipe import metrics_of
from worker.training.reporter import parse_line

pytest.importorskip("deepspeed")


def losses(events: list[dict]) -> list[float]:
    return [m["train_loss"] for m in metrics_of(events)]


def run_until_paused(tmp_path, config: dict, name: str, pause_at: int) -> tuple[int, list[dict]]:
    """Start a 2-process run and create its pause file once step `pause_at` is reported."""
    pause_file = tmp_path / f"{name}.pause"
    process = subprocess.Popen(
        torchrun(tmp_path, config, name), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "TUNEQUEUE_PAUSE_FILE": str(pause_file)},
    )  # fmt: skip
    events = []
    assert process.stdout is not None
    for line in process.stdout:
        event = parse_line(line)
        if event is None:
            continue
        events.append(event)
        if event["event"] == "metrics" and event["step"] == pause_at:
            pause_file.touch()
    return process.wait(timeout=600), events


@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", [2, 3])
def test_pause_and_checkpoints_of_two_processes_resume_on_the_same_curve(tmp_path, tiny_model, stage):
    config = tiny_job(tmp_path, tiny_model, checkpoint_every_steps=4, deepspeed_stage=stage)
    # A folder left at a checkpoint's path is cleared by one rank, before any rank writes into it (when every rank
    # cleared it, one rank could delete another's fresh files: a FileNotFoundError seen once in CI).
    stale = tmp_path / "straight/checkpoints/step-4/left-by-an-earlier-save"
    stale.parent.mkdir(parents=True)
    stale.write_text("stale")
    code, events, _ = run_distributed(tmp_path, config, "straight")
    assert code == 0, events
    assert not stale.exists()
    step4 = {p.name for p in stale.parent.iterdir()}
    assert {"adapter", "state.pt", "rng-rank-0.pt", "rng-rank-1.pt", "deepspeed"} <= step4, step4
    straight = losses(events)
    saved = [e for e in events if e["event"] == "checkpoint"]
    assert [e["step"] for e in saved] == [4, 8]
    shards = sorted(p.name for p in (tmp_path / "straight/checkpoints/step-4/deepspeed/state").iterdir())
    assert sum("optim_states" in name for name in shards) == 2, shards  # one ZeRO shard per rank

    code, first = run_until_paused(tmp_path, config, "paused", pause_at=2)
    paused = next(e for e in first if e["event"] == "paused")
    assert code == 0 and not any(e["event"] == "done" for e in first)
    assert paused["step"] == metrics_of(first)[-1]["step"] >= 2

    code, rest, _ = run_distributed(tmp_path, {**config, "resume_from": paused["path"]}, "resumed")
    assert code == 0, rest
    assert metrics_of(rest)[0]["step"] == paused["step"] + 1
    # fp32 master weights, AdamW moments, schedule and RNG all come back: the same curve (measured: exactly)
    assert losses(first) + losses(rest) == pytest.approx(straight, abs=1e-4)

    checkpoint = tmp_path / "straight/checkpoints/step-8"
    code, tail, _ = run_distributed(tmp_path, {**config, "resume_from": str(checkpoint)}, "from-step-8")
    assert code == 0, tail
    assert losses(tail) == pytest.approx(straight[8:], abs=1e-4)
    assert_same_adapter(tmp_path / "from-step-8/adapter", tmp_path / "straight/adapter")
    gap = max(abs(a - b) for a, b in zip(losses(first) + losses(rest), straight, strict=True))
    print(
        f"\nZeRO-{stage}: straight {[round(x, 4) for x in straight]}\n  paused at step {paused['step']}, resumed: "
        f"{[round(x, 4) for x in losses(first) + losses(rest)]} (largest gap {gap:.5f})\n  from step 8: "
        f"{[round(x, 4) for x in losses(tail)]}"
    )
