"""`python -m worker.training --config cfg.json --out DIR`: run the recipe with no service around it.
Exit codes: 0 done, 2 bad data or config (a user error), 3 paused (SIGUSR1 or the pause file: state saved;
a rank under torchrun exits 0 after its "paused" event), 1 anything else. An error event with
`retryable: true` (a full disk) is not the job's fault: the worker requeues the attempt."""

import argparse
import os
import sys
import traceback
from pathlib import Path

from pydantic import ValidationError

from worker.training.control import install_pause_handler
from worker.training.disk_space import is_disk_full
from worker.training.process import (
    DONE_EXIT_CODE,
    FAILED_EXIT_CODE,
    INVALID_INPUT_EXIT_CODE,
    PAUSED_EXIT_CODE,
    die_with_parent,
)
from worker.training.reporter import StdoutJsonReporter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.training", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="TrainingConfig as JSON")
    parser.add_argument("--out", type=Path, required=True, help="output folder (adapter/, checkpoints/)")
    args = parser.parse_args(argv)
    install_pause_handler()
    die_with_parent()
    reporter = StdoutJsonReporter()
    from worker.training.config import TrainingConfig

    try:
        config = TrainingConfig.from_file(args.config)
    except (ValidationError, ValueError, OSError) as exc:
        reporter.event("error", code="invalid_config", message=str(exc))
        return INVALID_INPUT_EXIT_CODE
    from worker.training.data import DatasetError
    from worker.training.recipe import Paused, train

    try:
        train(config, args.out, reporter)
    except Paused:
        # torchrun turns any non-zero exit of a rank into a failure of the whole run: ranks exit 0, and the
        # worker tells a pause from a finish by the "paused" event instead of "done".
        return DONE_EXIT_CODE if "LOCAL_RANK" in os.environ else PAUSED_EXIT_CODE
    except DatasetError as exc:
        reporter.event("error", code="invalid_training_file", message=str(exc), param="training_file")
        return INVALID_INPUT_EXIT_CODE
    except Exception as exc:  # reported to the worker, which fails the job with this code and message
        traceback.print_exc()
        if is_disk_full(exc, args.out):
            # The node's fault, not the job's: the worker requeues the attempt instead of failing the job.
            # The folder and the error's text are in the attempt's log (printed above), not in the job's events.
            message = "no space left on its worker's disk"
            reporter.event("error", code="disk_full", message=message, retryable=True)
            return FAILED_EXIT_CODE
        code = "out_of_memory" if "out of memory" in str(exc).lower() else "training_error"
        reporter.event("error", code=code, message=f"{type(exc).__name__}: {exc}", **where_it_failed(exc))
        return FAILED_EXIT_CODE
    return DONE_EXIT_CODE


def where_it_failed(exc: BaseException) -> dict:
    """The rank (under torchrun every rank reports its own failure) and the traceback's last frames."""
    frames = traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-3)
    fields: dict = {"traceback": "".join(frames)[-4000:]}
    if "LOCAL_RANK" in os.environ:
        fields["rank"] = int(os.environ.get("RANK", "0"))
    return fields


if __name__ == "__main__":
    sys.exit(main())
