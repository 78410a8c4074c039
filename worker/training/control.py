"""Pause requests reach the recipe as SIGUSR1 or as a file the worker creates. The handler is installed first
thing in the process (before torch loads), so a pause asked for during model loading is not the signal's
default action (terminate): it is honoured after the first step."""

import os
import signal
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
