"""How a failed attempt is described: from torchrun's real output, the rank and the signal or exit code and
that rank's last line, never a banner; of several ranks' reports, the first that is not an echo."""

import subprocess
import sys

import pytest

from tests.support import free_port
from worker.runner import cause, describe_crash

RANKS = """
import os, signal, sys, time
rank = int(os.environ["RANK"])
print(f"rank {rank} working", file=sys.stderr, flush=True)
if rank == 1:
    print("about to go", file=sys.stderr, flush=True)
    {fault}
time.sleep(30)
"""


def torchrun_stderr(tmp_path, fault: str) -> tuple[int, list[str]]:
    script = tmp_path / "ranks.py"
    script.write_text(RANKS.replace("{fault}", fault))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command += [str(free_port()), "--tee", "2", "--log-dir", str(tmp_path / "ranks"), str(script)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    return result.returncode, result.stderr.splitlines()


@pytest.mark.parametrize(
    "fault,expected",
    [
        ("os.kill(os.getpid(), signal.SIGKILL)", "(rank 1) was killed by signal SIGKILL"),
        ("sys.exit(7)", "(rank 1) exited with code 7: about to go"),
        ("raise RuntimeError('kaboom')", "(rank 1) exited with code 1: RuntimeError: kaboom"),
    ],
)
def test_a_crash_under_torchrun_names_the_rank_and_how_it_ended(tmp_path, fault, expected):
    returncode, stderr = torchrun_stderr(tmp_path, fault)
    assert returncode != 0
    assert describe_crash(returncode, stderr) == expected, "\n".join(stderr)


def test_a_single_process_crash_keeps_its_last_meaningful_line():
    lines = ["loading", "Traceback (most recent call last):", '  File "x.py", line 1', "MemoryError: no", "", "==="]
    assert describe_crash(1, lines) == "exited with code 1: MemoryError: no"
    assert describe_crash(-11, ["step 3", "  warnings.warn("]) == "was killed by signal SIGSEGV"
    assert describe_crash(-6, ["terminate called after throwing std::bad_alloc"]).endswith(
        ": terminate called after throwing std::bad_alloc"
    )


def test_the_cause_is_the_first_report_that_is_not_an_echo_of_it():
    echo = {"message": "DistBackendError: Connection closed by peer [127.0.0.1]:4242", "rank": 0}
    own = {"message": "ValueError: bad", "rank": 1}
    assert cause([echo, own]) is own
    assert cause([echo]) is echo
    assert cause([]) is None
