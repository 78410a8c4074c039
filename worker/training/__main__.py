"""`python -m worker.training --config cfg.json --out DIR`: run the recipe with no service around it.
`python -m worker.training --ready`: load the libraries first, then read the job from stdin (worker.training.ready).
Exit codes: 0 done, 2 bad data or config (a user error), 3 paused (SIGUSR1 or the pause file: state saved;
a rank under torchrun exits 0 after its "paused" event), 1 anything else. An error event with
`retryable: true` (a full disk) is not the job's fault: the worker requeues the attempt."""

import argparse
import os
import sys
import traceback
from pathlib import Path

from pydantic import ValidationError

from worker.training.control import install_pause_handler, pause_requested
from worker.training.disk_space import is_disk_full
from worker.training.process import (
    DONE_EXIT_CODE,
    FAILED_EXIT_CODE,
    FORK_SERVER_FLAG,
    FORKED_ENV,
    INVALID_INPUT_EXIT_CODE,
    PAUSED_EXIT_CODE,
    READY_FLAG,
    die_with_parent,
)
from worker.training.reporter import StdoutJsonReporter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.training", description=__doc__)
    parser.add_argument("--config", type=Path, help="TrainingConfig as JSON")
    parser.add_argument("--out", type=Path, help="output folder (adapter/, checkpoints/, evaluation.json)")
    parser.add_argument(
        READY_FLAG, nargs="?", const="", metavar="ROOM", help="load the libraries, then read the job from stdin"
    )
    parser.add_argument(
        FORK_SERVER_FLAG, nargs="?", const="", metavar="ROOM", help="load the libraries, then fork ready processes"
    )
    args = parser.parse_args(argv)
    if args.ready is None and args.fork_server is None and (args.config is None or args.out is None):
        parser.error("--config and --out are required (or --ready, or --fork-server)")
    install_pause_handler()
    die_with_parent()
    if args.fork_server is not None:
        from worker.training import fork_server

        return fork_server.main()
    reporter = StdoutJsonReporter()
    if args.ready is not None:
        job = take_job()
        if job is None:
            return DONE_EXIT_CODE  # retired by its worker before any job came
        args.config, args.out = job.config, job.out
        reporter.event("message", message=describe_warm_start(job))
    from worker.training.config import TrainingConfig

    try:
        config = TrainingConfig.from_file(args.config)
    except (ValidationError, ValueError, OSError) as exc:
        reporter.event("error", code="invalid_config", message=str(exc))
        return INVALID_INPUT_EXIT_CODE
    use_dataset_cache(config, reporter)
    from worker.training.data import DatasetError
    from worker.training.recipe import DoesNotFit, Paused, train

    try:
        train(config, args.out, reporter)
    except Paused:
        # torchrun turns any non-zero exit of a rank into a failure of the whole run: ranks exit 0, and the
        # worker tells a pause from a finish by the "paused" event instead of "done".
        return DONE_EXIT_CODE if "LOCAL_RANK" in os.environ else PAUSED_EXIT_CODE
    except DatasetError as exc:
        reporter.event("error", code="invalid_training_file", message=str(exc), param="training_file")
        return INVALID_INPUT_EXIT_CODE
    except DoesNotFit as exc:  # the job's options, not the node, are at fault: not retried
        reporter.event("error", code="insufficient_memory", message=str(exc), param=exc.param)
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


def take_job():
    """Waits for the job with the libraries loading meanwhile; a pause asked of this process before it had a
    job was not meant for the job."""
    from worker.training.ready import Preloader, wait_for_job

    job = wait_for_job(sys.stdin, Preloader().start())
    pause_requested.clear()
    return job


def describe_warm_start(job) -> str:
    forked = os.environ.get(FORKED_ENV)
    if forked is not None:
        loaded = float(forked)
        return f"Training process ready: forked from its worker's runtime (libraries loaded once, {loaded:.1f} s)"
    if job.loaded_before_job:
        return f"Training process ready: its libraries were loaded ({job.loaded_seconds:.1f} s) before the job came"
    return f"Training process ready, still loading its libraries when the job came ({job.loaded_seconds:.1f} s)"


def use_dataset_cache(config, reporter: StdoutJsonReporter) -> None:
    if config.dataset_cache_dir is None:
        return
    from worker.training import dataset_cache

    # Under torchrun every rank loads the data; one of them says so.
    say = reporter.event if os.environ.get("RANK", "0") == "0" else None
    dataset_cache.use(dataset_cache.DatasetCache(config.dataset_cache_dir, say))


def where_it_failed(exc: BaseException) -> dict:
    """The rank (under torchrun every rank reports its own failure) and the traceback's last frames."""
    frames = traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-3)
    fields: dict = {"traceback": "".join(frames)[-4000:]}
    if "LOCAL_RANK" in os.environ:
        fields["rank"] = int(os.environ.get("RANK", "0"))
    return fields


if __name__ == "__main__":
    sys.exit(main())
