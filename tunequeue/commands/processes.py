"""The long-running processes: the API server, a worker, both at once (`dev`), the sweeper, and the demo."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from shared import migrate
from shared.settings import get_settings
from tunequeue.console import Refused, require_current_schema, require_training_libraries

SHUTDOWN_GRACE_SECONDS = 30


def run_serve(args) -> int:
    import uvicorn

    if getattr(args, "migrate", False):
        migrate.upgrade()
    require_current_schema()
    describe_deployment()
    with shared_metrics_folder():
        uvicorn.run(
            "api.app:app",
            host=args.host,
            port=args.port,
            log_level="info",
            workers=getattr(args, "workers", 1),
            # On SIGTERM, requests in flight get this long; then open event streams are closed (their clients
            # reconnect with Last-Event-ID), which would otherwise hold the shutdown for up to an hour.
            timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
        )
    return 0


METRICS_FOLDER_ENV = "PROMETHEUS_MULTIPROC_DIR"


@contextmanager
def shared_metrics_folder() -> Iterator[None]:
    """Where the API processes write their request counts, for /metrics to add up (docs/metrics.md): a scrape
    reaches one process of `--workers N`, and must answer for all of them. Set here, before uvicorn imports the
    app in this process or starts the others, since prometheus_client reads it at import. A fresh, empty folder
    per server, removed when it stops: counts start at zero with the server, as Prometheus expects of a target
    that restarts. A folder the operator set is used as it is (and must be emptied before each start)."""
    if os.environ.get(METRICS_FOLDER_ENV):
        yield
        return
    folder = tempfile.mkdtemp(prefix="tunequeue-metrics-")
    os.environ[METRICS_FOLDER_ENV] = folder
    try:
        yield
    finally:
        os.environ.pop(METRICS_FOLDER_ENV, None)
        shutil.rmtree(folder, ignore_errors=True)


def describe_deployment() -> None:
    """Which state this process serves: the first thing to check when a job or a key seems to be missing."""
    settings = get_settings()
    print(f"data folder: {settings.resolved_data_dir}", file=sys.stderr)
    print(f"database:    {migrate.describe_database()}", file=sys.stderr)
    print(f"storage:     {settings.resolved_storage_url}", file=sys.stderr)


def worker_command(slots: int = 1, loglevel: str = "INFO") -> list[str]:
    """Threads: the Celery process only supervises (the recipe runs in its own child process), so a thread
    per job keeps the consumer responsive without forking a process that might import CUDA. One thread per
    slot, plus one so that validation does not wait behind training. The worker consumes the validation
    queue and the training queues of every device class it can serve."""
    from shared.queue import train_queues_for

    queues = [get_settings().queue_name, *train_queues_for(slots)]
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.app",
        "worker",
        "--pool",
        "threads",
        "--concurrency",
        str(slots + 1),
        "--loglevel",
        loglevel,
        "-Q",
        ",".join(queues),
        # One node name per process (pid@host, the pid survives the exec): two workers on one machine stay
        # apart in Celery, in heartbeats and in job leases.
        "--hostname",
        f"{os.getpid()}@{socket.gethostname()}",
        "--without-gossip",
        "--without-mingle",
    ]


def run_worker(args) -> int:
    from worker.slots import ENV, Slots, detect

    require_training_libraries("worker")
    if getattr(args, "inference", False):
        return run_inference_worker(args, spec_devices(args))
    if args.cpu_slots is not None and args.cpu_slots < 1:
        raise Refused("--cpu-slots must be at least 1")
    if args.devices:
        spec = f"gpu:{args.devices}"
    elif args.cpu_slots:
        spec = f"cpu:{args.cpu_slots}"
    else:
        spec = os.environ.get(ENV) or detect()
    slots = Slots.from_spec(spec)
    os.environ[ENV] = spec
    print(f"worker slots: {spec} ({slots.total})", file=sys.stderr)
    os.execv(sys.executable, worker_command(slots.total, args.loglevel))


def spec_devices(args) -> str | None:
    """An inference worker's devices: the GPUs it was given (pinned like a training worker's), else none."""
    return args.devices or None


def run_inference_worker(args, devices: str | None) -> int:
    """Replaced by `python -m worker.inference` (torch lives there, never in this package)."""
    require_current_schema()
    if devices:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices  # these GPUs only, as a training worker's slots pin them
    command = [*inference_worker_command(), "--host", args.host, "--port", str(args.port or 0)]
    command += ["--models", args.models or ""] + (["--advertise-url", args.advertise_url] if args.advertise_url else [])
    os.execv(sys.executable, command)


def inference_worker_command() -> list[str]:
    return [sys.executable, "-m", "worker.inference"]


def run_dev(args) -> int:
    """The API, a training worker and an inference worker on this machine."""
    migrate.upgrade()
    hint_if_no_models()
    first_key()
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"Dashboard: http://{host}:{args.port}/ui (sign in with an API key)", file=sys.stderr)
    workers = [subprocess.Popen(worker_command()), subprocess.Popen(inference_worker_command())]
    print("Started a training worker and an inference worker (chat.completions)", file=sys.stderr)
    try:
        return run_serve(args)
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=30)


def hint_if_no_models() -> None:
    from shared.basemodels.service import list_base_models
    from shared.db import session_scope

    with session_scope() as session:
        if not list_base_models(session):
            print(
                "No base model imported yet: run `tunequeue models import-demo` (SmolLM2-135M-Instruct) "
                "or `tunequeue models import-gguf PATH --name ID` before submitting jobs."
            )


def first_key() -> None:
    """A fresh install has no key, and every route needs one: make the first (admin, tenant `default`). Only
    then: once any key was ever made, a missing working key is the operator's call (they revoked it, or let it
    expire), and a key printed to whoever reads this terminal would undo it."""
    from shared.auth import service
    from shared.db import session_scope

    with session_scope() as session:
        if service.has_active_keys(session):
            return
        if service.has_any_keys(session):
            print(
                "No API key is active (all are revoked or expired), so every request gets 401. Make one with "
                "`tunequeue keys create --tenant default --admin`."
            )
            return
        _, secret = service.create_key(session, "default", admin=True, name="created by tunequeue dev")
    print(f"No API key existed; created an admin key for tenant 'default' (shown once):\n\n    {secret}\n")


def run_sweep(args) -> int:
    from shared.jobs import state
    from shared.jobs.recovery import sweep
    from shared.webhooks.service import record_job_transition

    require_current_schema()
    state.after_transition(record_job_transition)  # a job the sweep fails or cancels reaches webhooks too
    report = sweep()
    print(f"requeued: {report.requeued or '-'}\nfailed (worker_lost): {report.failed or '-'}")
    print(f"republished: {report.republished or '-'}")
    print(f"checkpoints collected: {len(report.collected_checkpoints)}")
    return 0


def run_demo(args) -> int:
    from tunequeue.demo import run

    return run(port=args.port, epochs=args.epochs)
