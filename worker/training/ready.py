"""A recipe process started before its job (`python -m worker.training --ready`): it imports torch,
transformers, peft, bitsandbytes and the recipe's modules while it waits, without touching CUDA, then reads
its one job from stdin as one JSON line {"config", "out", "env"}, applies the job's environment (its devices,
its pause file) and runs the recipe exactly as `--config … --out …` would. EOF instead of a job: the worker
retired it, and it exits 0. One job per process: memory and devices are released when it exits, as before."""

import ctypes
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

# Niceness of the loading thread: a replacement loads while the job that took its predecessor trains, and the
# training must keep the CPUs.
LOADING_NICENESS = 10


@dataclass
class ReadyJob:
    config: Path
    out: Path
    env: dict[str, str]
    waited_seconds: float
    loaded_seconds: float
    loaded_before_job: bool


class Preloader:
    """Imports the recipe's libraries on a thread of its own, at a lower priority, while the process waits."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.finished: float | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._load, name="tunequeue-preload", daemon=True)

    def start(self) -> "Preloader":
        self.thread.start()
        return self

    def _load(self) -> None:
        try:
            set_thread_niceness(LOADING_NICENESS)
            import_recipe()
        except BaseException as exc:  # the job still runs: its own imports will raise it where they did
            self.error = exc
        finally:
            self.finished = time.monotonic()

    def join(self) -> tuple[float, bool]:
        """Seconds the libraries took to load, and whether they were loaded before the job came."""
        loaded_before = self.finished is not None
        self.thread.join()
        restore_niceness()
        assert self.finished is not None
        return self.finished - self.started, loaded_before


def import_recipe() -> None:
    from worker.training.model import import_bitsandbytes  # first: bitsandbytes without TorchInductor

    import_bitsandbytes()
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig  # noqa: F401

    import worker.training.recipe  # noqa: F401

    # The job's CUDA_VISIBLE_DEVICES is read when CUDA initialises: that must happen after the job came.
    if torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised while loading the recipe's libraries")


def set_thread_niceness(niceness: int) -> None:
    """Linux: the niceness of the calling thread only (threads it starts inherit it)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except OSError:
        pass


def restore_niceness() -> None:
    """Threads the loading thread started (by the libraries it imported) got its niceness: give them the
    process's own back where the system lets us lower it (privileged, or RLIMIT_NICE); if not, they stay."""
    base = os.getpriority(os.PRIO_PROCESS, 0)
    for tid in os.listdir("/proc/self/task"):
        try:
            if os.getpriority(os.PRIO_PROCESS, int(tid)) != base:
                os.setpriority(os.PRIO_PROCESS, int(tid), base)
        except OSError:
            continue


def wait_for_job(stream: TextIO, preloader: Preloader) -> ReadyJob | None:
    waiting = time.monotonic()
    line = stream.readline()
    if not line.strip():
        return None
    waited = time.monotonic() - waiting
    job = json.loads(line)
    # Before anything touches CUDA: the job's devices, its pause file.
    os.environ.update({str(k): str(v) for k, v in job.get("env", {}).items()})
    loaded, before = preloader.join()
    if preloader.error is not None:
        raise preloader.error
    config, out = Path(job["config"]), Path(job["out"])
    retitle([sys.orig_argv[0], "-m", "worker.training", "--config", str(config), "--out", str(out)])
    return ReadyJob(config, out, job.get("env", {}), waited, loaded, before)


def retitle(args: list[str]) -> bool:
    """Rewrite this process's command line in place (NUL-separated, like argv): it must fit in the room the
    original one took, which `--ready` reserves."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        arg_start, arg_end = int(fields[45]), int(fields[46])  # fields 48 and 49 of proc(5), after pid and comm
    except (OSError, IndexError, ValueError):
        return False
    title = b"\0".join(arg.encode() for arg in args) + b"\0"
    room = arg_end - arg_start
    if room <= 0 or len(title) > room:
        return False
    ctypes.memmove(arg_start, title.ljust(room, b"\0"), room)
    return True
