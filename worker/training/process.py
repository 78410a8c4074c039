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
