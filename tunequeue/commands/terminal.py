"""How the `files` and `jobs` commands show things: results on stdout (text, or JSON with `--json`), progress
bars on stderr so that `ID=$(tunequeue files upload data.jsonl)` captures only the result, UTC times."""

import json
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it
PIPED_WIDTH = 1000


def stdout() -> Console:
    """Lines are never wrapped; piped into a file or another program, tables keep their natural width too
    (rich's default there would be 80 columns)."""
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = PIPED_WIDTH
    return console


def stderr() -> Console:
    return Console(stderr=True, highlight=False)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def transfer_progress() -> Progress:
    """A bytes bar (size, speed, time left) on stderr; nothing at all when stderr is not a terminal."""
    console = stderr()
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


def timestamp(epoch: int | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"
