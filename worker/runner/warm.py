"""Warm runtimes: one recipe process per device slot, started before any job and kept ready (its libraries
imported, CUDA untouched), so that an attempt on one device skips the seconds of importing torch and its
kin. Each process takes one job and exits with it, as a process started for the job would. Its replacement
starts once that job has reported its first step on a GPU slot, once it has ended on a CPU slot (the job's
training uses every core there: `worker/runner/job.py`). A ready process that died, or that loaded other code
than is on disk now, is retired, never used. Jobs on several devices (torchrun) start their processes when
they come."""

import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from shared.settings import Settings
from worker.runner.child import RecipeProcess, recipe_environment, start_recipe_process
from worker.slots import Lease, Slots
from worker.training.process import FORK_SERVER_SOCKET_ENV, die_when_parent_dies, fork_server_command, ready_command

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


class ForkedProcess:
    """A ready recipe process forked by the fork server, whose child it is: what the runner uses of a
    `subprocess.Popen` (its pid, its pipes, poll, wait, returncode), its end as the server reports it."""

    def __init__(self, pid: int, stdin: int, stdout: int, stderr: int):
        self.pid = pid
        self.stdin = open(stdin, "w", buffering=1, encoding="utf-8")  # noqa: SIM115
        self.stdout = open(stdout, encoding="utf-8", errors="replace")  # noqa: SIM115
        self.stderr = open(stderr, encoding="utf-8", errors="replace")  # noqa: SIM115
        self.returncode: int | None = None
        self._ended = threading.Event()

    def ended(self, returncode: int) -> None:
        if self.returncode is None:
            self.returncode = returncode
        self._ended.set()

    def poll(self) -> int | None:
        return self.returncode

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)  # it leads its own session
        except ProcessLookupError:
            pass

    def communicate(self, input: str | None = None, timeout: float | None = None) -> tuple[str, str]:
        """Popen's: `input` written, stdin closed, stdout and stderr read to their end, the process waited for."""
        if input and not self.stdin.closed:
            self.stdin.write(input)
        self.stdin.close()
        read: dict[str, str] = {}
        readers = [
            threading.Thread(target=lambda name=name, stream=stream: read.__setitem__(name, stream.read()), daemon=True)
            for name, stream in (("out", self.stdout), ("err", self.stderr))
        ]
        for reader in readers:
            reader.start()
        self.wait(timeout)
        for reader in readers:
            reader.join()
        return read.get("out", ""), read.get("err", "")

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(f"forked recipe process {self.pid}", timeout or 0)
        assert self.returncode is not None
        return self.returncode


class ForkServer:
    """The worker's end of `python -m worker.training --fork-server` (worker.training.fork_server): one process
    that has loaded the recipe's libraries and forks each ready process from itself. Started from the warm
    runtimes' long-lived thread (the parent-death signal follows the thread that started a process)."""

    LOAD_TIMEOUT_SECONDS = 600

    def __init__(self, python: str, env: dict[str, str]):
        self.code = code_fingerprint(python)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = subprocess.Popen(
                fork_server_command(python),
                env={**env, FORK_SERVER_SOCKET_ENV: str(theirs.fileno())},
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_when_parent_dies,
            )
        finally:
            theirs.close()
        self.sock = ours
        self.requests = threading.Lock()  # one fork at a time: the server answers them in order
        self.pids: queue.Queue[int | None] = queue.Queue()
        self.lock = threading.Lock()
        self.children: dict[int, ForkedProcess] = {}
        self.exits: dict[int, int] = {}  # ends reported before their process was registered
        self.gone = False
        self.loaded_seconds: float | None = None
        self.reader = threading.Thread(target=self._read, name="tunequeue-fork-server", daemon=True)
        self.reader.start()

    def fork(self, env: dict[str, str], module: str | None = None, args: tuple[str, ...] = ()) -> ForkedProcess:
        """A ready process with `env` (or `python -m module args…`), once the server has loaded its libraries;
        OSError if it cannot fork."""
        ends = [os.pipe() for _ in range(3)]  # stdin, stdout, stderr: (read, write) each
        theirs = [ends[0][0], ends[1][1], ends[2][1]]
        try:
            with self.requests:
                if self.gone:
                    raise OSError("the fork server has ended")
                request = {"env": env, **({"module": module, "args": list(args)} if module else {})}
                socket.send_fds(self.sock, [json.dumps(request).encode()], theirs)
                try:
                    pid = self.pids.get(timeout=self.LOAD_TIMEOUT_SECONDS)
                except queue.Empty:  # a late answer would be taken for the next request's: not used again
                    self.kill()
                    raise OSError(f"the fork server answered no fork in {self.LOAD_TIMEOUT_SECONDS} s") from None
        except BaseException:
            for fd in (ends[0][1], ends[1][0], ends[2][0]):
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        if pid is None:
            for fd in (ends[0][1], ends[1][0], ends[2][0]):
                os.close(fd)
            raise OSError("the fork server ended before it forked")
        process = ForkedProcess(pid, ends[0][1], ends[1][0], ends[2][0])
        with self.lock:
            self.children[pid] = process
            if pid in self.exits or self.gone:
                process.ended(self.exits.pop(pid, -signal.SIGKILL))
        return process

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            message = json.loads(data)
            if "pid" in message:
                self.pids.put(message["pid"])
            elif "exit" in message:
                with self.lock:
                    process = self.children.pop(message["exit"], None)
                    if process is None:
                        self.exits[message["exit"]] = message["returncode"]
                if process is not None:
                    process.ended(message["returncode"])
            elif "loaded_seconds" in message:
                self.loaded_seconds = message["loaded_seconds"]
        # The server ended (or was killed): its processes died with it (PDEATHSIG).
        with self.lock:
            self.gone = True
            orphans, self.children = list(self.children.values()), {}
        for process in orphans:
            process.ended(-signal.SIGKILL)
        self.pids.put(None)
        self.process.wait()

    def close(self) -> None:
        """No more forks; the server exits once the processes it forked (jobs training) have ended."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def kill(self) -> None:
        self.gone = True
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class ReadyProcess:
    process: RecipeProcess
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

    # How long a job waits for its slot's ready process when one is being started (the fork server loading its
    # libraries after the worker's start); past it, the job starts its own process.
    READY_WAIT_SECONDS = 120

    def __init__(self, python: str, slots: dict[str, dict[str, str]], fork: bool = False):
        self.python = python
        self.slots = slots  # slot id -> the device environment of a job on that slot alone
        self.fork = fork  # ready processes forked by a fork server, or each started as its own interpreter
        self.server: ForkServer | None = None
        self.ready: dict[str, ReadyProcess] = {}
        self.starting: set[str] = set()
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.closed = False
        self.requests: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._start_requested, name="tunequeue-warm-runtimes", daemon=True)

    def start(self) -> "WarmRuntimes":
        self.thread.start()
        for slot in self.slots:
            self._request(slot)
        return self

    def _request(self, slot: str) -> None:
        with self.lock:
            self.starting.add(slot)
        self.requests.put(slot)

    def take(self, lease: Lease) -> ReadyProcess | None:
        """The ready process of the lease's one slot, if it is alive and runs the code on disk now. None: the
        attempt starts its own process. Either way `replenish` starts the slot's next one."""
        slot = self._slot(lease)
        if slot is None:
            return None
        deadline = time.monotonic() + self.READY_WAIT_SECONDS
        with self.changed:
            while slot not in self.ready and slot in self.starting and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.changed.wait(min(left, 1.0))
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
            self._request(slot)

    def _slot(self, lease: Lease) -> str | None:
        return lease.ids[0] if len(lease.ids) == 1 and lease.ids[0] in self.slots else None

    def describe(self) -> dict[str, int]:
        with self.lock:
            return {slot: ready.process.pid for slot, ready in self.ready.items() if ready.process.poll() is None}

    def close(self) -> None:
        with self.changed:
            self.closed = True
            retired, self.ready = list(self.ready.values()), {}
            self.changed.notify_all()
        if self.server is not None:
            self.server.close()
        # The starting thread stays (idle): its end would send the parent-death signal to every process it
        # started, the ones running jobs included.
        for ready in retired:
            ready.retire()

    def _start_requested(self) -> None:
        while True:
            slot = self.requests.get()
            ready = None
            with self.lock:
                wanted = not self.closed and slot not in self.ready
            if wanted:
                try:
                    ready = self._start(slot)
                except OSError as exc:  # the next job on this slot starts its own process
                    log.warning("could not start a ready recipe process for slot %s: %s", slot, exc)
            with self.changed:
                self.starting.discard(slot)
                if ready is not None and not self.closed:
                    self.ready[slot] = ready
                    ready = None
                self.changed.notify_all()
            if ready is not None:
                ready.retire()

    def _start(self, slot: str) -> ReadyProcess:
        if self.fork:
            server = self._fork_server()
            return ReadyProcess(server.fork(self.slots[slot]), slot, server.code, time.monotonic())
        code = code_fingerprint(self.python)
        env = recipe_environment(self.slots[slot], None)
        process = start_recipe_process(ready_command(self.python), env, stdin=subprocess.PIPE)
        return ReadyProcess(process, slot, code, time.monotonic())

    def loaded_server(self) -> ForkServer | None:
        """The fork server, if it has loaded its libraries and runs the code on disk now; never starts one (the
        runtimes' own thread does: the parent-death signal follows the thread that started a process)."""
        server = self.server
        if server is None or server.gone or server.loaded_seconds is None:
            return None
        return server if server.code == code_fingerprint(self.python) else None

    def _fork_server(self) -> ForkServer:
        """The running fork server, or a new one if it ended or loaded other code than is on disk now (the old
        one exits once the jobs of the processes it forked have ended)."""
        server = self.server
        if server is None or server.gone or server.code != code_fingerprint(self.python):
            if server is not None:
                server.close()
            # CUDA availability asked through NVML while loading, not the driver, which would not survive a fork.
            env = {**recipe_environment({}, None), "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
            server = self.server = ForkServer(self.python, env)
        return server


RUNTIMES: WarmRuntimes | None = None


def start_warm_runtimes(settings: Settings, slots: Slots) -> WarmRuntimes | None:
    """Called once the worker is up. Only for the worker's own interpreter: a TUNEQUEUE_TRAINING_PYTHON may be
    a wrapper that decides when it starts what it runs, and so starts when its job does."""
    global RUNTIMES
    count = slots.total if settings.warm_runtimes is None else min(settings.warm_runtimes, slots.total)
    if count == 0 or settings.training_python not in (None, sys.executable):
        return None
    environments = {slot: Lease(slots.kind, [slot]).environment() for slot in slots.ids[:count]}
    # A GPU slot's replacement loads on the CPU while its job trains on the GPU, so forking saves little there,
    # and a library that touched the CUDA driver while loading would leave a forked process without CUDA.
    fork = settings.warm_runtime_fork if settings.warm_runtime_fork is not None else slots.kind == "cpu"
    RUNTIMES = WarmRuntimes(sys.executable, environments, fork=fork).start()
    return RUNTIMES


def stop_warm_runtimes() -> None:
    global RUNTIMES
    if RUNTIMES is not None:
        RUNTIMES.close()
        RUNTIMES = None


def start_module(module: str, args: list[str], env: dict[str, str], python: str | None = None) -> RecipeProcess:
    """`python -m module args…` for an evaluation or an export: forked from the worker's fork server when it has
    one loaded (the libraries' seconds of importing saved), else started as a process of its own."""
    runtimes = RUNTIMES
    server = runtimes.loaded_server() if runtimes is not None and python in (None, runtimes.python) else None
    if server is not None:
        try:
            process = server.fork(env, module, tuple(args))
        except OSError as exc:
            log.warning("could not fork %s from the fork server (%s); starting it", module, exc)
        else:
            process.stdin.close()
            return process
    return start_recipe_process([python or sys.executable, "-m", module, *args], env)


def take(lease: Lease | None) -> ReadyProcess | None:
    runtimes = RUNTIMES
    return runtimes.take(lease) if runtimes is not None and lease is not None else None


def replenish(lease: Lease | None) -> None:
    runtimes = RUNTIMES
    if runtimes is not None and lease is not None:
        runtimes.replenish(lease)
