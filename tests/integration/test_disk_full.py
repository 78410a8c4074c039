"""A worker whose scratch disk fills up. A full disk is the node's fault, not the job's: the attempt is requeued
(`disk_full`, a system error), nothing half-written is ever recorded, and the job finishes once there is room
again, or fails with `disk_full` after TUNEQUEUE_MAX_ATTEMPTS if the disk stays full.

The worker's TMPDIR is a small tmpfs mounted by the test (root only; skipped elsewhere). Scratch holds the
job's downloaded data, the recipe's checkpoints and the adapter before upload."""

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared.storage import StorageError
from tests.faults import wait_for
from tests.integration.test_chaos import CHAOS_ENV, Inspector, check_invariants, is_attempt_log, parrot, scenario
from tests.support import ROOT, TERMINAL, chat, write_jsonl
from worker.training.disk_space import is_disk_full
from worker.training.reporter import parse_line

# The tiny model's resumable checkpoint takes about 300 KB, its adapter about 70 KB: 128 KB holds the job's
# data and config but not a checkpoint.
TOO_SMALL_FOR_A_CHECKPOINT = "128k"


class ScratchDisk:
    """A tmpfs of a given size at `path`, resized or filled while workers use it."""

    def __init__(self, path: Path):
        self.path = path
        self.mounted = False

    def mount(self, size: str) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.path)], capture_output=True, text=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}): the disk-full tests need root")
        self.mounted = True
        return self.path

    def resize(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True, capture_output=True)

    def leave_free(self, free: int) -> None:
        """Fill the disk with a ballast file until exactly `free` bytes are left."""
        usage = subprocess.run(["df", "-B1", "--output=avail", str(self.path)], capture_output=True, text=True)
        available = int(usage.stdout.split()[-1])
        (self.path / "ballast").write_bytes(b"\0" * (available - free))

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "--lazy", str(self.path)], check=True, capture_output=True)


@pytest.fixture
def scratch_disk(tmp_path):
    disk = ScratchDisk(tmp_path / "scratch-disk")
    yield disk
    disk.unmount()


@pytest.fixture
def disk_env(production_env):
    return {**production_env, **CHAOS_ENV}


@pytest.fixture
def inspector(disk_env, moto_endpoint):
    inspector = Inspector(disk_env, moto_endpoint)
    yield inspector
    inspector.dispose()


def submit(stack, tmp_path, n_epochs: int) -> str:
    file = stack.upload(parrot(tmp_path))
    job = stack.create_job(
        model="tiny-llama", training_file=file["id"], seed=3, hyperparameters={"n_epochs": n_epochs, "batch_size": 4}
    )
    return job["id"]


def messages(inspector: Inspector, job_id: str) -> list[str]:
    return [event["message"] for event in inspector.events(job_id)]


def test_the_recipe_reports_a_full_disk_as_retryable(scratch_disk, tiny_model, tmp_path):
    out = scratch_disk.mount(TOO_SMALL_FOR_A_CHECKPOINT) / "out"
    train = write_jsonl(tmp_path / "train.jsonl", [chat(f"Say {i}", f"Squawk! {i}.") for i in range(24)])
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({"base_model_path": str(tiny_model), "train_file": str(train), "checkpoint_every_steps": 2})
    )
    result = subprocess.run(
        [sys.executable, "-m", "worker.training", "--config", str(config), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    events = [event for event in map(parse_line, result.stdout.splitlines()) if event]
    assert result.returncode == 1, result.stderr[-3000:]
    error = events[-1]
    assert error["event"] == "error" and error["code"] == "disk_full" and error["retryable"] is True, error
    assert "no space left" in error["message"]
    assert not any(event["event"] in ("checkpoint", "done") for event in events)  # nothing offered for upload


def test_a_full_disk_is_recognised_however_a_library_words_it(scratch_disk, tmp_path):
    import torch

    full = scratch_disk.mount("64k")
    with pytest.raises(RuntimeError) as torch_save:  # "unexpected pos …": no errno, no words about space
        torch.save({"weights": torch.zeros(100_000)}, full / "state.pt")
    assert is_disk_full(torch_save.value, full)  # told by the folder's disk, which has no room left
    assert not is_disk_full(RuntimeError("unexpected pos 576 vs 534"), tmp_path)  # the same words, disk with room
    wrapped = StorageError("downloading train.jsonl failed after 2 tries")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(wrapped)
    assert is_disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path)


def test_a_full_disk_requeues_the_attempt_and_the_job_finishes_once_there_is_room(
    scratch_disk, make_stack, disk_env, tiny_model, tmp_path, inspector
):
    with scenario("scratch disk full at the first checkpoint, then room made") as figures:
        scratch = scratch_disk.mount(TOO_SMALL_FOR_A_CHECKPOINT)
        stack = make_stack(disk_env, tiny_model, worker=False)
        stack.start_worker("worker", env={"TMPDIR": str(scratch)})
        job_id = submit(stack, tmp_path, n_epochs=1)

        def requeued_for_the_full_disk() -> bool:
            return any("no space left" in m and "requeued: attempt 2" in m for m in messages(inspector, job_id))

        wait_for(
            lambda: requeued_for_the_full_disk() or inspector.job(job_id)["status"] in TERMINAL,
            240,
            "the first attempt to end",
        )
        assert requeued_for_the_full_disk(), (inspector.job(job_id)["error"], messages(inspector, job_id))
        scratch_disk.resize("64m")  # the operator makes room; attempt 2 is still loading its model
        job = stack.wait(job_id, timeout=300)

        assert job["status"] == "succeeded", (job["error"], stack.logs())
        row = inspector.job(job_id)
        figures["attempts"] = row["attempt"]
        assert row["attempt"] >= 2
        # Nothing of the attempt that hit the full disk counts: no checkpoint row, no object but its log.
        assert not [c for c in inspector.checkpoints(job_id) if c["attempt"] == 1]
        keys = inspector.keys(f"tenants/{row['tenant']}/jobs/{job_id}/attempt-1/")
        assert [k for k in keys if not is_attempt_log(k, row)] == [], keys
        check_invariants(inspector, [job_id])


def test_a_disk_that_stays_full_fails_the_job_as_disk_full(
    scratch_disk, make_stack, disk_env, tiny_model, tmp_path, inspector
):
    with scenario("scratch disk stays full") as figures:
        scratch = scratch_disk.mount("1m")
        # One page left: Python's tempfile can still check that it may write there (and make the scratch
        # folder), but the 8 KB training file does not fit. The worker's own download fails, not the recipe's.
        scratch_disk.leave_free(4096)
        env = {**disk_env, "TUNEQUEUE_MAX_ATTEMPTS": "2", "TUNEQUEUE_STORAGE_RETRIES": "2"}
        stack = make_stack(env, tiny_model, worker=False)
        stack.start_worker("worker", env={"TMPDIR": str(scratch)})
        file = stack.upload(parrot(tmp_path, n=64))
        job_id = stack.create_job(model="tiny-llama", training_file=file["id"], hyperparameters={"n_epochs": 1})["id"]
        job = stack.wait(job_id, timeout=120)

        assert job["status"] == "failed", (job, stack.logs())
        figures["outcome"] = f"failed {job['error']['code']} after {inspector.job(job_id)['attempt']} attempts"
        assert job["error"]["code"] == "disk_full", job["error"]
        message = job["error"]["message"]
        assert "no space left" in message.lower() and "giving up after 2 attempt(s)" in message
        assert any("requeued: attempt 2 of 2" in m for m in messages(inspector, job_id))
        assert job["fine_tuned_model"] is None and inspector.checkpoints(job_id) == []
        row = inspector.job(job_id)
        keys = inspector.keys(f"tenants/{row['tenant']}/jobs/{job_id}/")
        assert [k for k in keys if not is_attempt_log(k, row)] == [], keys
        check_invariants(inspector, [job_id])
