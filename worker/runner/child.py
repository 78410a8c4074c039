"""The recipe's child process: its command line (one process, or one per device under torchrun), its own
process group, the readers of its stdout and stderr, the pause file, its stop, and the attempt's log."""

import json
import logging
import os
import signal
import socket
import subprocess
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Protocol

from shared.settings import get_settings
from shared.storage import Storage, StorageError, with_retries
from worker.runner import allocator
from worker.training.control import PAUSE_FILE_ENV
from worker.training.process import PARENT_PID_ENV, die_when_parent_dies
from worker.training.reporter import parse_line

log = logging.getLogger("tunequeue.worker")
STOP_GRACE_SECONDS = 5
STDERR_TAIL_LINES = 200  # torchrun's failure report alone is ~30 lines; the failing rank's lines come before it
LOG_MAX_BYTES = 8 * 2**20


def recipe_command(python: str, config: Path, out: Path, devices: int) -> list[str]:
    recipe = ["-m", "worker.training", "--config", str(config), "--out", str(out)]
    if devices == 1:
        return [python, *recipe]
    # One process per device, trained together by DeepSpeed.
    command = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(devices)]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    # Every rank's stderr reaches the attempt's log with its rank in front ("[default1]:…").
    return command + ["--tee", "2", "--log-dir", str(out.parent / "ranks"), *recipe]


def recipe_environment(device_env: dict[str, str], pause_file: Path | None) -> dict[str, str]:
    """A ready process (no pause file yet) gets the job's part, `job_environment`, with its job."""
    return {
        # A GPU lease trains over NCCL, whatever DeepSpeed accelerator the worker itself was started with.
        **{k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR" or device_env.get(k)},
        **allocator.environment(get_settings().training_allocator, dict(os.environ)),
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        PARENT_PID_ENV: str(os.getpid()),  # the recipe dies with this worker (PDEATHSIG)
        **(job_environment(device_env, pause_file) if pause_file is not None else device_env),
    }


def job_environment(device_env: dict[str, str], pause_file: Path) -> dict[str, str]:
    return {PAUSE_FILE_ENV: str(pause_file), **device_env}  # its own devices only


class RecipeProcess(Protocol):
    """What the runner uses of the recipe's process: a `subprocess.Popen`, or a ready process forked by the
    worker's fork server (`worker.runner.warm.ForkedProcess`)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> Any: ...  # int once it has ended (Popen's own annotation)

    @property
    def stdin(self) -> IO[str] | None: ...

    @property
    def stdout(self) -> IO[str] | None: ...

    @property
    def stderr(self) -> IO[str] | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...

    def communicate(self, input: str | None = None, timeout: float | None = None) -> tuple[str, str]: ...


def start_recipe_process(command: list[str], env: dict[str, str], stdin: int | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
        start_new_session=True,
        preexec_fn=die_when_parent_dies,  # torchrun included, whose ranks in turn die with it
        env=env,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AttemptLog:
    """The attempt's output (the recipe's and every rank's stderr, its stdout but the reports), kept as an
    object of the attempt, readable at GET /v1/fine_tuning/jobs/{id}/attempts/{n}/log."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.file = open(path, "w", encoding="utf-8", errors="replace")  # noqa: SIM115

    def write(self, line: str) -> None:
        with self.lock:
            if not self.file.closed:
                self.file.write(line + "\n")

    def keep(self, storage: Storage, key: str, what: str, tries: int) -> None:
        with self.lock:
            self.file.close()
        data = head_and_tail(self.path.read_bytes(), LOG_MAX_BYTES)
        try:
            with_retries(lambda: storage.put_bytes(key, data), what, tries)
        except StorageError as exc:  # the job's outcome does not depend on its log
            log.warning("%s", exc)


def head_and_tail(data: bytes, limit: int) -> bytes:
    """A very long log keeps its beginning and its end."""
    if len(data) <= limit:
        return data
    head, tail = data[: limit // 8], data[-(limit - limit // 8) :]
    return head + f"\n[… {len(data) - len(head) - len(tail)} bytes left out …]\n".encode() + tail


class RecipeChild:
    """The recipe running in its own session, so its own process group: a stop kills the recipe and anything
    it started, and a Ctrl-C meant for the worker does not reach the recipe first. Each report line on its
    stdout goes to `on_report`; everything else goes to the attempt's log."""

    def __init__(self, name: str, folder: Path, on_report: Callable[[dict], None]):
        self.name, self.on_report = name, on_report
        self.pause_file = folder / "pause-requested"
        self.log = AttemptLog(folder / "attempt.log")
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.process: RecipeProcess | None = None
        self.readers: list[threading.Thread] = []

    def start(self, command: list[str], device_env: dict[str, str]) -> None:
        self.process = start_recipe_process(command, recipe_environment(device_env, self.pause_file))
        self._follow()

    def adopt(self, process: RecipeProcess, config: Path, out: Path, device_env: dict[str, str]) -> None:
        """Give the job to a process started before it (a warm runtime): it already runs in its own session
        and dies with this worker; what it printed while loading is read now, into this attempt's log."""
        self.process = process
        job = {"config": str(config), "out": str(out), "env": job_environment(device_env, self.pause_file)}
        assert process.stdin is not None
        try:
            process.stdin.write(json.dumps(job) + "\n")
            process.stdin.close()
        except OSError:  # it died since it was checked: its exit code and stderr tell the attempt why
            pass
        self._follow()

    def _follow(self) -> None:
        self.readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    @property
    def running_process(self) -> RecipeProcess:
        assert self.process is not None, "the recipe was not started"
        return self.process

    def poll(self) -> int | None:
        return self.running_process.poll()

    def join_readers(self) -> int:
        """Its exit code, once its output has been read to the end (or the readers gave up waiting)."""
        for reader in self.readers:
            reader.join(timeout=10)
        return self.running_process.returncode

    def request_pause(self) -> None:
        """Every rank finishes its step, saves its whole state, reports "paused" and exits. A file, not a
        signal: torchrun would not pass SIGUSR1 on to the ranks."""
        self.pause_file.touch()

    def stop(self) -> None:
        process = self.running_process
        for sig, wait in ((signal.SIGTERM, STOP_GRACE_SECONDS), (signal.SIGKILL, 10)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def _read_stdout(self) -> None:
        assert self.running_process.stdout is not None
        for line in self.running_process.stdout:
            report = parse_line(line.rstrip("\n"))
            if report is None:
                log.info("[%s] %s", self.name, line.rstrip())
                self.log.write(line.rstrip("\n"))
            else:
                self.on_report(report)

    def _read_stderr(self) -> None:
        assert self.running_process.stderr is not None
        for line in self.running_process.stderr:
            self.stderr_tail.append(line.rstrip())
            self.log.write(line.rstrip("\n"))
