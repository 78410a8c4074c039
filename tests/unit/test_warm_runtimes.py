"""The worker's pool of ready recipe processes, on a stand-in process that waits for its job line (the real
recipe in a ready process: tests/integration/test_warm_start.py)."""

import json
import os
import signal
import sys
import time

import pytest

from tests.faults import wait_for
from worker.runner import warm
from worker.runner.child import RecipeChild
from worker.slots import Lease, Slots
from worker.training.process import PARENT_PID_ENV
from worker.training.ready import retitle

# Prints the job line it was given and, once the job's environment is applied, its pause file; exits 0.
STAND_IN = (
    "import json, os, sys; job = sys.stdin.readline(); print(job.strip()); "
    "os.environ.update(json.loads(job)['env']); print(os.environ.get('TUNEQUEUE_PAUSE_FILE'))"
)


@pytest.fixture
def runtimes(monkeypatch):
    monkeypatch.setattr(warm, "ready_command", lambda python: [python, "-c", STAND_IN])
    pool = warm.WarmRuntimes(sys.executable, {"0": Lease("cpu", ["0"]).environment()}).start()
    wait_for(pool.describe, 10, "a ready process")
    yield pool
    pool.close()


def test_a_job_goes_to_the_ready_process_of_its_slot_and_a_replacement_follows(runtimes, tmp_path):
    [pid] = runtimes.describe().values()
    ready = runtimes.take(Lease("cpu", ["0"]))
    assert ready is not None and ready.process.pid == pid
    lines: list[str] = []
    child = RecipeChild("job", tmp_path, lambda report: None)
    child.log.write = lines.append
    child.adopt(ready.process, tmp_path / "config.json", tmp_path / "out", {"CUDA_VISIBLE_DEVICES": ""})
    assert child.running_process.wait(timeout=10) == 0 and child.join_readers() == 0
    assert runtimes.describe() == {}  # the next one loads once this job is under way, not beside its start
    runtimes.replenish(Lease("cpu", ["0"]))
    job = json.loads(lines[0])
    assert job["config"] == str(tmp_path / "config.json") and job["out"] == str(tmp_path / "out")
    assert job["env"]["CUDA_VISIBLE_DEVICES"] == "" and lines[1] == str(tmp_path / "pause-requested")
    replacement = wait_for(lambda: runtimes.describe().get("0"), 10, "the replacement")
    assert replacement != pid


def test_ready_processes_run_in_their_own_session_and_know_their_worker(runtimes):
    [pid] = runtimes.describe().values()
    assert os.getsid(pid) == pid
    environ = dict(item.split("=", 1) for item in open(f"/proc/{pid}/environ").read().split("\0") if "=" in item)
    assert environ[PARENT_PID_ENV] == str(os.getpid()) and environ["CUDA_VISIBLE_DEVICES"] == ""


def test_a_dead_ready_process_is_not_used(runtimes):
    [pid] = runtimes.describe().values()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: runtimes.ready["0"].process.poll() is not None, 10, "its death")
    assert runtimes.take(Lease("cpu", ["0"])) is None
    runtimes.replenish(Lease("cpu", ["0"]))
    assert wait_for(lambda: runtimes.describe().get("0"), 10, "the replacement") != pid


def test_a_ready_process_that_loaded_other_code_is_not_used(runtimes, monkeypatch):
    [pid] = runtimes.describe().values()
    monkeypatch.setattr(warm, "code_fingerprint", lambda python: ("changed",))
    assert runtimes.take(Lease("cpu", ["0"])) is None
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", 10, "it")
    runtimes.replenish(Lease("cpu", ["0"]))
    assert wait_for(lambda: runtimes.describe().get("0"), 10, "the replacement") != pid


def test_jobs_on_several_devices_start_their_own_processes(runtimes):
    assert runtimes.take(Lease("cpu", ["0", "1"])) is None
    assert "0" in runtimes.describe()  # still ready for a one-device job


def test_closing_stops_the_ready_processes(runtimes):
    [pid] = runtimes.describe().values()
    runtimes.close()
    assert runtimes.describe() == {}
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_settings_choose_how_many_slots_are_kept_warm(monkeypatch):
    from shared.settings import Settings

    started: list[dict] = []
    monkeypatch.setattr(warm.WarmRuntimes, "start", lambda self: started.append(self.slots) or self)
    slots = Slots("gpu", ["0", "1", "2"])
    assert warm.start_warm_runtimes(Settings(warm_runtimes=0), slots) is None
    assert warm.start_warm_runtimes(Settings(training_python="/opt/wrapper"), slots) is None
    warm.start_warm_runtimes(Settings(warm_runtimes=2), slots)
    warm.start_warm_runtimes(Settings(), slots)
    assert [list(s) for s in started] == [["0", "1"], ["0", "1", "2"]]
    assert started[0]["1"] == {"CUDA_VISIBLE_DEVICES": "1"}
    warm.RUNTIMES = None


def test_a_ready_process_takes_its_jobs_command_line(tmp_path):
    """The room `--ready` keeps in argv holds the job's command line, NUL-separated as ps and /proc show it."""
    script = (
        "import sys, time; from worker.training.ready import retitle; "
        "print(retitle(['python', '-m', 'worker.training', '--config', 'c.json', '--out', 'out']), flush=True); "
        "time.sleep(5)"
    )
    import subprocess

    process = subprocess.Popen(
        [sys.executable, "-c", script, " " * 200], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    try:
        assert process.stdout.readline().strip() == "True"
        args = open(f"/proc/{process.pid}/cmdline", "rb").read().rstrip(b"\0").split(b"\0")
        assert args == [b"python", b"-m", b"worker.training", b"--config", b"c.json", b"--out", b"out"]
    finally:
        process.kill()
        process.wait()
    assert retitle(["x" * 10**6]) is False  # more than the room: left as it was


def cmdline_of(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline") as cmdline:
        return cmdline.read().split("\0")


def stat_of(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def test_ready_processes_forked_from_the_fork_server(tmp_path):
    """The real fork server (it loads the recipe's libraries once): each ready process is forked from it in its
    own session, runs the recipe with its job's environment and exits with the recipe's code; closing the pool
    retires the ready ones and the server ends once its processes have; a ready process dies with its server."""
    slots = {"0": Lease("cpu", ["0"]).environment(), "1": Lease("cpu", ["1"]).environment()}
    pool = warm.WarmRuntimes(sys.executable, slots, fork=True).start()
    try:
        ready = pool.take(Lease("cpu", ["0"]))  # waits for the server's libraries, then its fork
        assert ready is not None and isinstance(ready.process, warm.ForkedProcess)
        server = pool.server
        assert server is not None and server.loaded_seconds is not None
        pid = ready.process.pid
        assert os.getsid(pid) == pid and int(stat_of(pid)[1]) == server.process.pid  # its own session, the server's
        assert int(stat_of(server.process.pid)[1]) == os.getpid()  # the server is the worker's child
        # The child retitles itself just after the fork, possibly after the server reported its pid: wait for it.
        title = ["-m", "worker.training", "--ready"]
        deadline = time.monotonic() + 10
        while cmdline_of(pid)[1:4] != title and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cmdline_of(pid)[1:4] == title

        lines: list[str] = []
        child = RecipeChild("job", tmp_path, lambda report: lines.append(report))
        child.adopt(ready.process, tmp_path / "missing.json", tmp_path / "out", {"CUDA_VISIBLE_DEVICES": ""})
        assert child.running_process.wait(timeout=60) == 2 and child.join_readers() == 2  # invalid config
        said = [r.get("message", "") for r in lines]
        assert said[0].startswith("Training process ready: forked from its worker's runtime"), said
        assert any(r.get("code") == "invalid_config" for r in lines), lines

        pool.replenish(Lease("cpu", ["0"]))
        second = pool.take(Lease("cpu", ["0"]))
        assert second is not None and second.process.pid not in (pid, None)
        os.kill(second.process.pid, signal.SIGKILL)
        assert second.process.wait(timeout=10) == -signal.SIGKILL  # the server reports how it ended

        other = wait_for(lambda: pool.describe().get("1"), 10, "slot 1's ready process")
        pool.close()
        assert not os.path.exists(f"/proc/{other}") or stat_of(other)[0] == "Z"
        assert server.process.wait(timeout=10) == 0  # nothing left of it to wait for
    finally:
        pool.close()


def test_a_forked_process_dies_with_its_fork_server():
    pool = warm.WarmRuntimes(sys.executable, {"0": Lease("cpu", ["0"]).environment()}, fork=True).start()
    try:
        ready = pool.take(Lease("cpu", ["0"]))
        assert ready is not None and pool.server is not None
        os.kill(pool.server.process.pid, signal.SIGKILL)
        assert ready.process.wait(timeout=10) == -signal.SIGKILL
        wait_for(lambda: not os.path.exists(f"/proc/{ready.process.pid}"), 10, "the forked process to die")
        pool.replenish(Lease("cpu", ["0"]))  # a new server takes over
        again = pool.take(Lease("cpu", ["0"]))
        assert again is not None and again.process.poll() is None and pool.server.process.poll() is None
    finally:
        pool.close()


def test_evaluations_and_exports_are_forked_from_a_loaded_fork_server(monkeypatch, tmp_path):
    """`start_module` runs `python -m module args…` forked from the fork server once it has loaded (argv, pipes
    and exit code as a started process has them), and starts it as its own process otherwise."""
    (tmp_path / "in.json").write_text('{"b": 1, "a": 2}')
    env = dict(os.environ)
    started = warm.start_module("json.tool", [str(tmp_path / "in.json")], env)  # no worker runtimes: started
    assert not isinstance(started, warm.ForkedProcess) and started.wait(timeout=30) == 0

    pool = warm.WarmRuntimes(sys.executable, {"0": Lease("cpu", ["0"]).environment()}, fork=True).start()
    monkeypatch.setattr(warm, "RUNTIMES", pool)
    try:
        wait_for(pool.describe, 120, "the fork server's first ready process")
        forked = warm.start_module("json.tool", ["--sort-keys", str(tmp_path / "in.json")], env)
        assert isinstance(forked, warm.ForkedProcess)
        assert pool.server is not None and int(stat_of(forked.pid)[1]) == pool.server.process.pid
        out, err = forked.communicate(timeout=30)
        assert forked.returncode == 0 and json.loads(out) == {"a": 2, "b": 1} and out.index('"a"') < out.index('"b"')
        failed = warm.start_module("json.tool", [str(tmp_path / "missing.json")], env)
        assert isinstance(failed, warm.ForkedProcess)
        out, err = failed.communicate(timeout=30)
        assert failed.returncode == 2 and "missing.json" in err, err  # argparse's exit, as `python -m` gives it
    finally:
        pool.close()


def test_ready_processes_are_forked_on_cpu_workers_and_spawned_on_gpu_workers(monkeypatch):
    from shared.settings import Settings

    chosen: list[bool] = []
    monkeypatch.setattr(warm.WarmRuntimes, "start", lambda self: chosen.append(self.fork) or self)
    for kind, ids in (("cpu", ["0", "1"]), ("gpu", ["0"])):
        warm.start_warm_runtimes(Settings(), Slots(kind, ids))
        warm.start_warm_runtimes(Settings(warm_runtime_fork=kind == "gpu"), Slots(kind, ids))
    assert chosen == [True, False, False, True]
    warm.RUNTIMES = None
