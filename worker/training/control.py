"""Pause requests reach the recipe as SIGUSR1 or as a file the worker creates. The handler is installed first
thing in the process (before torch loads), so a pause asked for during model loading is not the signal's
default action (terminate): it is honoured after the first step."""

import ctypes
import os
import signal
import sys
import threading

pause_requested = threading.Event()


PAUSE_FILE_ENV = "TUNEQUEUE_PAUSE_FILE"


def install_pause_handler() -> None:
    signal.signal(signal.SIGUSR1, lambda *_: pause_requested.set())


def pause_is_requested() -> bool:
    """SIGUSR1 (one process, or by hand), or the file the worker names in TUNEQUEUE_PAUSE_FILE: torchrun does
    not pass signals on to its ranks, and every rank of a job must stop at the same step anyway."""
    if not pause_requested.is_set():
        path = os.environ.get(PAUSE_FILE_ENV)
        if path and os.path.exists(path):
            pause_requested.set()
    return pause_requested.is_set()


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: the kernel kills this process when the worker that started it dies (even by `kill -9`), so a
    lost worker never leaves an orphan training on its devices. The worker's pid comes in
    TUNEQUEUE_PARENT_PID: if it is already gone, exit at once."""
    parent = os.environ.get("TUNEQUEUE_PARENT_PID")
    if parent is None or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if "LOCAL_RANK" in os.environ:
        return  # a rank under torchrun: it dies with torchrun, which dies with the worker
    if os.getppid() != int(parent):
        os._exit(1)
