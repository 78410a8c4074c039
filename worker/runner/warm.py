"""Warm runtimes: one recipe process per device slot, started before any job and kept ready (its libraries
imported, CUDA untouched), so that an attempt on one device skips the seconds of importing torch and its
kin. Each process takes one job and exits with it, as a process started for the job would. Its replacement
starts once that job has reported its first step on a GPU slot, once it has ended on a CPU slot (the job's
training uses every core there: `worker/runner/job.py`). A ready process that died, or that loaded other code
than is on disk now, is retired, never used. Jobs on several devices (torchrun) start their processes when
they come."""

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from shared.settings import Settings
from worker.runner.child import recipe_environment, start_recipe_process
from worker.slots import Lease, Slots
from worker.training.process import ready_command

log = logging.getLogger("tunequeue.worker")
# The code a ready process imported: if any of it changed since (a deployment), the process is retired.
CODE_ROOTS = [Path(__file__).resolve().parents[2] / package for package in ("worker", "shared")]


def code_fingerprint(python: str) -> tuple:
    """Cheap (stat only): the interpreter and every module under worker/ and shared/, by size and mtime."""
    stamps: list[tuple] = [(python, os.stat(python).st_mtime_ns)]
    for root in CODE_ROOTS:
        for path in sorted(root.rglob("*.py")):
            stat = path.stat()
            stamps.append((str(path), stat.st_size, stat.st_mtime_ns))
    return tuple(stamps)


@dataclass
class ReadyProcess:
    process: subprocess.Popen[str]
    slot: str
    code: tuple
    started: float

    def retire(self) -> None:
        """Its stdin closed, a waiting process exits by itself; one still loading is stopped."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        self.process.wait()


class WarmRuntimes:
    """Ready processes by slot. All of them are started from one long-lived thread: the kernel's
    parent-death signal follows the thread that started a process, so a thread that ended would take its
    processes with it."""

    def __init__(self, python: str, slots: dict[str, dict[str, str]]):
        self.python = python
        self.slots = slots  # slot id -> the device environment of a job on that slot alone
        self.ready: dict[str, ReadyProcess] = {}
        self.lock = threading.Lock()
        self.closed = False
        self.requests: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._start_requested, name="tunequeue-warm-runtimes", daemon=True)

    def start(self) -> "WarmRuntimes":
        self.thread.start()
        for slot in self.slots:
            self.requests.put(slot)
        return self

    def take(self, lease: Lease) -> ReadyProcess | None:
        """The ready process of the lease's one slot, if it is alive and runs the code on disk now. None: the
        attempt starts its own process. Either way `replenish` starts the slot's next one."""
        slot = self._slot(lease)
        if slot is None:
            return None
        with self.lock:
            ready = self.ready.pop(slot, None)
        if ready is None:
            return None
        if ready.process.poll() is not None or ready.code != code_fingerprint(self.python):
            log.warning("ready recipe process %s of slot %s is gone or stale; not used", ready.process.pid, slot)
            ready.retire()
            return None
        return ready

    def replenish(self, lease: Lease) -> None:
        """Start a ready process for the lease's slot if it has none (idempotent)."""
        slot = self._slot(lease)
        if slot is not None:
            self.requests.put(slot)

    def _slot(self, lease: Lease) -> str | None:
        return lease.ids[0] if len(lease.ids) == 1 and lease.ids[0] in self.slots else None

    def describe(self) -> dict[str, int]:
        with self.lock:
            return {slot: ready.process.pid for slot, ready in self.ready.items() if ready.process.poll() is None}

    def close(self) -> None:
        with self.lock:
            self.closed = True
            retired, self.ready = list(self.ready.values()), {}
        # The starting thread stays (idle): its end would send the parent-death signal to every process it
        # started, the ones running jobs included.
        for ready in retired:
            ready.retire()

    def _start_requested(self) -> None:
        while True:
            slot = self.requests.get()
            with self.lock:
                if self.closed or slot in self.ready:
                    continue
            try:
                ready = self._start(slot)
            except OSError as exc:  # the next job on this slot starts its own process
                log.warning("could not start a ready recipe process for slot %s: %s", slot, exc)
                continue
            with self.lock:
                if not self.closed:
                    self.ready[slot] = ready
                    continue
            ready.retire()

    def _start(self, slot: str) -> ReadyProcess:
        code = code_fingerprint(self.python)
        env = recipe_environment(self.slots[slot], None)
        process = start_recipe_process(ready_command(self.python), env, stdin=subprocess.PIPE)
        return ReadyProcess(process, slot, code, time.monotonic())


RUNTIMES: WarmRuntimes | None = None


def start_warm_runtimes(settings: Settings, slots: Slots) -> WarmRuntimes | None:
    """Called once the worker is up. Only for the worker's own interpreter: a TUNEQUEUE_TRAINING_PYTHON may be
    a wrapper that decides when it starts what it runs, and so starts when its job does."""
    global RUNTIMES
    count = slots.total if settings.warm_runtimes is None else min(settings.warm_runtimes, slots.total)
    if count == 0 or settings.training_python not in (None, sys.executable):
        return None
    environments = {slot: Lease(slots.kind, [slot]).environment() for slot in slots.ids[:count]}
    RUNTIMES = WarmRuntimes(sys.executable, environments).start()
    return RUNTIMES


def stop_warm_runtimes() -> None:
    global RUNTIMES
    if RUNTIMES is not None:
        RUNTIMES.close()
        RUNTIMES = None


def take(lease: Lease | None) -> ReadyProcess | None:
    runtimes = RUNTIMES
    return runtimes.take(lease) if runtimes is not None and lease is not None else None


def replenish(lease: Lease | None) -> None:
    runtimes = RUNTIMES
    if runtimes is not None and lease is not None:
        runtimes.replenish(lease)
