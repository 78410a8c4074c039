"""Progress through one small protocol: `log(step, metrics)`, `event(kind, **fields)`. The child process
writes machine-readable lines on stdout for the worker; a person running the recipe alone sees them too."""

import json
import sys
from typing import Protocol

from worker.training.events import RECIPE_EVENT

PREFIX = "@tunequeue "


class Reporter(Protocol):
    def log(self, step: int, metrics: dict) -> None: ...

    def event(self, kind: str, **fields) -> None: ...


class StdoutJsonReporter:
    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def log(self, step: int, metrics: dict) -> None:
        self.event("metrics", **{**metrics, "step": step})

    def event(self, kind: str, **fields) -> None:
        line = json.dumps({"event": kind, **fields}, default=str)
        # Validated as the worker will read it: a malformed report fails here, naming its field.
        RECIPE_EVENT.validate_json(line)
        self.stream.write(PREFIX + line + "\n")
        self.stream.flush()


def parse_line(line: str) -> dict | None:
    """The event on a line of the child's stdout, or None for ordinary output."""
    if not line.startswith(PREFIX):
        return None
    try:
        return json.loads(line[len(PREFIX) :])
    except json.JSONDecodeError:
        return None
