"""Pause requests reach the recipe as SIGUSR1. The handler is installed first thing in the process (before
torch loads), so a pause asked for during model loading is not the signal's default action (terminate): it
is honoured after the first step."""

import signal
import threading

pause_requested = threading.Event()


def install_pause_handler() -> None:
    signal.signal(signal.SIGUSR1, lambda *_: pause_requested.set())
