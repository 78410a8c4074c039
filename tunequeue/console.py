"""How every command ends: exit codes, the error prefix, and the check that the database is ready."""

import sys
from collections.abc import Sequence

EXIT_OK = 0
EXIT_REFUSED = 1  # the command ran and was refused or failed, with the reason on stderr
EXIT_USAGE = 2  # argparse: the command line itself is wrong


class Refused(Exception):
    """A command cannot do what it was asked; the message says why and what to run instead."""


def require_training_libraries(command: str) -> None:
    """Commands that run the recipe or convert models need torch: in an image without it (the API image)
    they say where to run instead of failing deep inside."""
    import importlib.util

    try:
        missing = importlib.util.find_spec("torch") is None
    except ModuleNotFoundError:
        missing = True
    if missing:
        raise Refused(
            f"`{command}` needs the worker's libraries (torch), which this installation lacks: run it where the "
            "worker runs (e.g. `docker compose run --rm worker ...`), or install `tunequeue[worker]`"
        )


def error(command: str, message: str) -> None:
    print(f"tunequeue {command}: error: {message}", file=sys.stderr)


def require_current_schema() -> None:
    """Commands that read or write tables say what to run when the schema is missing or old, instead of
    failing with a database traceback."""
    from shared import migrate

    problem = schema_state().problem
    if problem:
        raise Refused(f"the database {migrate.describe_database()} {problem}")


def schema_state():
    from sqlalchemy.exc import OperationalError

    from shared import migrate

    try:
        return migrate.schema_state()
    except OperationalError as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0]
        raise Refused(
            f"cannot reach the database {migrate.describe_database()} ({reason}); start it, "
            "or point TUNEQUEUE_DATABASE_URL at it"
        ) from exc


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [header, *rows]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)
