"""How the recipe's process ends and how it dies with the worker that started it: agreed between the recipe
and the worker, so it is torch-free (the worker imports it in the Celery process)."""

import ctypes
import os
import signal
import sys

DONE_EXIT_CODE = 0
FAILED_EXIT_CODE = 1
INVALID_INPUT_EXIT_CODE = 2  # bad data or config: the user's error
PAUSED_EXIT_CODE = 3  # state saved; a rank under torchrun exits 0 instead (torchrun fails a run on any other code)

PARENT_PID_ENV = "TUNEQUEUE_PARENT_PID"
READY_FLAG = "--ready"
FORK_SERVER_FLAG = "--fork-server"
FORK_SERVER_SOCKET_ENV = "TUNEQUEUE_FORK_SERVER_FD"  # the fork server's end of its control socket
FORKED_ENV = "TUNEQUEUE_FORKED_RUNTIME"  # in a forked ready process: the seconds its libraries took, once
# Room kept in a ready process's command line for its job's: `ps` and /proc/<pid>/cmdline then show the job's
# config and output folder, as they do for a process started for the job.
TITLE_ROOM = 2048
PR_SET_PDEATHSIG = 1


def die_when_parent_dies() -> None:
    """Linux: the kernel kills this process (SIGKILL) when the one that started it dies, even by `kill -9`."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def die_with_parent() -> None:
    """A lost worker never leaves an orphan training on its devices. The worker's pid comes in
    TUNEQUEUE_PARENT_PID: if it is already gone, exit at once."""
    parent = os.environ.get(PARENT_PID_ENV)
    if parent is None or not sys.platform.startswith("linux"):
        return
    die_when_parent_dies()
    if "LOCAL_RANK" in os.environ:
        return  # a rank under torchrun: it dies with torchrun, which dies with the worker
    if os.getppid() != int(parent):
        os._exit(1)


def ready_command(python: str) -> list[str]:
    """A recipe process that loads its libraries now and reads its job from stdin later (worker.training.ready)."""
    return [python, "-m", "worker.training", READY_FLAG, " " * TITLE_ROOM]


def fork_server_command(python: str) -> list[str]:
    """The process that forks ready recipe processes from its loaded libraries (worker.training.fork_server)."""
    return [python, "-m", "worker.training", FORK_SERVER_FLAG, " " * TITLE_ROOM]
