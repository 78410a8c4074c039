"""`tunequeue jobs`: create, list, inspect, control, watch and download fine-tuning jobs on a tunequeue server,
over its REST API (the routes OpenAI's SDK uses, plus tunequeue's pause, resume and adapter download)."""

import argparse
import hashlib
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from tunequeue.commands.client import (
    SLOW_TIMEOUT,
    ApiError,
    Client,
    ClientError,
    ServerUnreachable,
    resolve_connection,
)
from tunequeue.commands.terminal import (
    EXIT_INTERRUPTED,
    duration,
    print_json,
    stdout,
    timestamp,
    transfer_progress,
)

JOBS = "/v1/fine_tuning/jobs"
STATUSES = ("validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
SERVER_PAGE = 100  # the most jobs the server lists per request
EVENT_PAGE = 20
BACKLOG_EVENTS = 10  # what `watch` shows of a job's history before following it
RETRYABLE = frozenset({429, 502, 503, 504})
PATIENCE_SECONDS = 60.0


def run_jobs(args) -> int:
    try:
        with Client(resolve_connection(args.url, args.api_key)) as client:
            return ACTIONS[args.action](client, args)
    except KeyboardInterrupt:
        said = INTERRUPTED.get(args.action, INTERRUPTED_REQUEST).format(job=getattr(args, "job_id", ""))
        print(f"\nInterrupted: {said}", file=sys.stderr)
        return EXIT_INTERRUPTED


# create


def create(client: Client, args) -> int:
    answer = client.post(JOBS, json=job_body(args), timeout=SLOW_TIMEOUT)
    if args.dry_run:
        return show_dry_run(answer, args.json)
    if args.json:
        print_json(answer)
        return 0
    print(answer["id"])
    hint = f"follow it with `tunequeue jobs watch {answer['id']}`"
    print(f"Created {answer['id']} ({answer['status']}); {hint}", file=sys.stderr)
    return 0


def job_body(args) -> dict[str, Any]:
    """OpenAI's body: hyperparameters under `method.supervised` (the top-level `hyperparameters` is deprecated);
    only what was given is sent, the server resolves the rest ("auto")."""
    body: dict[str, Any] = {"model": args.model, "training_file": args.training_file}
    optional = {"validation_file": args.validation_file, "suffix": args.suffix, "seed": args.seed}
    body.update({name: value for name, value in optional.items() if value is not None})
    given = {
        "n_epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate_multiplier": args.learning_rate_multiplier,
    }
    hyperparameters = {name: value for name, value in given.items() if value is not None}
    if hyperparameters:
        body["method"] = {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
    if args.metadata:
        body["metadata"] = dict(args.metadata)
    if args.dry_run:
        body["dry_run"] = True
    return body


def metadata_pair(text: str) -> tuple[str, str]:
    """`--metadata team=ml`: a malformed pair is a usage error (exit 2) naming the option."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def page_size(text: str) -> int:
    """`--limit`: what the server takes in one page (1-100)."""
    if not text.isdigit() or not 1 <= int(text) <= SERVER_PAGE:
        raise argparse.ArgumentTypeError(f"expected a number from 1 to {SERVER_PAGE}, got {text!r}")
    return int(text)


def seconds(text: str) -> float:
    """`--interval`: a number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def show_dry_run(answer: dict, as_json: bool) -> int:
    """The server's report; a dry run whose data is not usable exits 1, naming the first bad lines."""
    report = answer.get("report") or {}
    if as_json:
        print_json(answer)
    else:
        console = stdout()
        verdict = "the data is usable; no job was created" if answer["valid"] else "the data is not usable"
        console.print(Text(f"Dry run: {verdict}"))
        console.print(key_values(dry_run_rows(answer, report)))
        for warning in (report.get("warnings") or [])[:5]:
            console.print(Text(f"warning: line {warning['line']}: {warning['message']}"))
    if not answer["valid"]:
        errors = "; ".join(f"line {e['line']}: {e['message']}" for e in (report.get("errors") or [])[:5])
        raise ClientError(f"the data is not usable: {errors or 'see the report'}")
    return 0


def dry_run_rows(answer: dict, report: dict) -> list[tuple[str, Any]]:
    data = (
        f"{report.get('examples', 0):,} {report.get('format') or ''} examples, "
        f"{report.get('total_tokens', 0):,} tokens ({report.get('loss_tokens', 0):,} in the loss), "
        f"{report.get('truncated_examples', 0):,} truncated"
    )
    estimate = (
        f"{answer['estimated_trained_tokens']:,} trained tokens, about {duration(answer['estimated_seconds'])} "
        f"({answer['estimate_basis']})"
    )
    return [
        ("model", answer["model"]),
        ("data", data),
        ("hyperparameters", settings(answer.get("hyperparameters") or {})),
        ("estimate", estimate),
    ]


def key_values(rows: list[tuple[str, Any]]) -> Text:
    """Name and value, a line each, values aligned; rows without a value are left out."""
    shown = [(name, str(value)) for name, value in rows if value]
    width = max(len(name) for name, _ in shown)
    return Text("\n".join(f"{name:<{width}}  {value}" for name, value in shown))


def settings(values: dict) -> str:
    return ", ".join(f"{name}={values[name]}" for name in sorted(values))


# list, get, cancel / pause / resume


def list_jobs(client: Client, args) -> int:
    page = fetch_jobs(client, args.status, args.limit, args.after)
    if args.json:
        print_json(page)
        return 0
    if not page["data"]:
        print("No fine-tuning jobs" + (f" with status {args.status}" if args.status else "") + ".")
        return 0
    table = Table("ID", "STATUS", "MODEL", "CREATED (UTC)", "FINE-TUNED MODEL", box=None, pad_edge=False)
    for job in page["data"]:
        created = timestamp(job["created_at"])
        table.add_row(job["id"], job["status"], job["model"], created, job["fine_tuned_model"] or "")
    for column in table.columns:
        column.overflow = "fold"  # ids wrap rather than lose characters on a narrow terminal
    stdout().print(table)
    if page["has_more"]:
        print(f"More: `tunequeue jobs list --after {page['data'][-1]['id']}`", file=sys.stderr)
    return 0


def fetch_jobs(client: Client, status: str | None, limit: int, after: str | None) -> dict:
    """One page from the server, filtered there by status (a tunequeue extension of the list)."""
    return client.get(JOBS, limit=limit, after=after, status=status)


def get(client: Client, args) -> int:
    job = client.get(f"{JOBS}/{args.job_id}")
    if args.json:
        print_json(job)
    else:
        stdout().print(summary(job))
    return 0


def summary(job: dict) -> Text:
    progress = job.get("progress") or {}
    error = job.get("error") or {}
    rows: list[tuple[str, Any]] = [
        ("id", job["id"]),
        ("status", job["status"]),
        ("model", job["model"]),
        ("fine-tuned model", job.get("fine_tuned_model")),
        ("created (UTC)", timestamp(job["created_at"])),
        ("finished (UTC)", timestamp(job.get("finished_at"))),
        ("training file", job["training_file"]),
        ("validation file", job.get("validation_file")),
        ("hyperparameters", settings(job.get("hyperparameters") or {})),
        ("progress", steps(progress)),
        ("losses", Losses.of(progress).describe()),
        ("estimated finish", timestamp(job.get("estimated_finish")) if job["status"] == "running" else None),
        ("trained tokens", f"{job['trained_tokens']:,}" if job.get("trained_tokens") else None),
        ("error", f"{error.get('code')}: {error.get('message')}" if error else None),
    ]
    return key_values(rows)


def steps(progress: dict) -> str | None:
    return f"step {progress['step']}/{progress['total_steps']}" if "total_steps" in progress else None


def control(client: Client, args) -> int:
    job = client.post(f"{JOBS}/{args.job_id}/{args.action}")
    if args.json:
        print_json(job)
        return 0
    print(control_message(args.action, job))
    return 0


def control_message(action: str, job: dict) -> str:
    status = job["status"]
    if action == "cancel" and status != "cancelled":
        return f"Cancellation requested: {job['id']} ({status}) stops at its worker's next check"
    if action == "pause" and status == "running":
        return f"Pause requested: {job['id']} saves its state after the current step, then is paused"
    if action == "resume":
        return f"Resumed {job['id']} ({status}): it continues from its saved state"
    return f"{job['id']} is {status}"


# watch


@dataclass
class Losses:
    """The newest train and valid loss seen: a metrics event carries valid_loss only at evaluation steps."""

    train: float | None = None
    valid: float | None = None

    @classmethod
    def of(cls, metrics: dict) -> "Losses":
        losses = cls()
        losses.update(metrics)
        return losses

    def update(self, metrics: dict | None) -> None:
        metrics = metrics or {}
        if metrics.get("train_loss") is not None:
            self.train = metrics["train_loss"]
        if metrics.get("valid_loss") is not None:
            self.valid = metrics["valid_loss"]

    def describe(self) -> str:
        parts = [f"train loss {self.train:.4f}" if self.train is not None else ""]
        parts.append(f"valid loss {self.valid:.4f}" if self.valid is not None else "")
        return ", ".join(filter(None, parts))


class EventFollower:
    """A job's new events, oldest first. The server pages events newest first (`after` names the last event of
    the previous page and reaches further back), so each poll reads back from the newest event to the first
    one already seen. The first poll shows the last few events of the job's history."""

    def __init__(self, client: Client, job_id: str):
        self.client = client
        self.path = f"{JOBS}/{job_id}/events"
        self.seen: set[str] = set()
        self.started = False

    def poll(self) -> list[dict]:
        if not self.started:
            self.started = True
            return self.take(self.client.get(self.path, limit=BACKLOG_EVENTS)["data"])
        fresh: list[dict] = []
        after = None
        while True:
            page = self.client.get(self.path, limit=EVENT_PAGE, after=after)
            for event in page["data"]:
                if event["id"] in self.seen:
                    return self.take(fresh)
                fresh.append(event)
            if not page["has_more"] or not page["data"]:
                return self.take(fresh)
            after = page["data"][-1]["id"]

    def take(self, newest_first: list[dict]) -> list[dict]:
        self.seen.update(event["id"] for event in newest_first)
        return newest_first[::-1]


class Patience:
    """Once a watch has started, it outlives a restarting server or a database failover: connection failures
    and 429/502/503/504 answers are retried for up to a minute, said once per outage."""

    def __init__(self, notify: Callable[[str], None]):
        self.notify = notify
        self.deadline: float | None = None

    def call(self, fetch: Callable[[], Any]) -> Any:
        while True:
            try:
                result = fetch()
            except (ServerUnreachable, ApiError) as exc:
                if isinstance(exc, ApiError) and exc.status not in RETRYABLE:
                    raise
                if self.deadline is None:
                    self.deadline = time.monotonic() + PATIENCE_SECONDS
                    self.notify(f"{exc}; retrying for up to {PATIENCE_SECONDS:.0f} s")
                if time.monotonic() > self.deadline:
                    raise
                time.sleep(1)
                continue
            self.deadline = None
            return result


def follow(client: Client, job_id: str, interval: float, notify: Callable[[str], None]) -> Iterator[tuple[dict, list]]:
    """The job and its new events, every `interval` seconds, until the job is in a terminal state. The job is
    read before its events, so that the events of its last poll include the one of its final transition."""
    follower = EventFollower(client, job_id)
    job = client.get(f"{JOBS}/{job_id}")  # an unknown id or an unreachable server fails at once
    patience = Patience(notify)
    while True:
        events = patience.call(follower.poll)
        yield job, events
        if job["status"] in TERMINAL:
            return
        time.sleep(interval)
        job = patience.call(lambda: client.get(f"{JOBS}/{job_id}"))


def watch(client: Client, args) -> int:
    if args.json:
        return watch_json(client, args)
    console = stdout()
    losses = Losses()
    job: dict = {}
    bar = Progress(
        TextColumn("{task.description}"),
        TextColumn("{task.fields[status]:<16}"),  # as wide as the longest status, so the bar stays put
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        console=console,
        disable=not console.is_terminal,
    )
    with bar:
        task = bar.add_task(escape(args.job_id), total=None, status="", detail="")
        for job, events in follow(client, args.job_id, args.interval, lambda note: console.print(Text(note))):
            for event in events:
                losses.update(event.get("data"))
                console.print(event_line(event))
            losses.update(job.get("progress"))
            bar.update(task, **bar_fields(job, losses))
    return finish(job, losses, console)


def watch_json(client: Client, args) -> int:
    """One JSON object a line: each new event, then the job in its terminal state."""
    job: dict = {}
    for polled, events in follow(client, args.job_id, args.interval, lambda note: print(note, file=sys.stderr)):
        job = polled
        for event in events:
            print(json_line(event), flush=True)
    print(json_line(job), flush=True)
    return finish(job, Losses.of(job.get("progress") or {}), None)


def json_line(value: dict) -> str:
    return json.dumps(value, separators=(",", ":"))


def event_line(event: dict) -> Text:
    style = {"error": "red", "warn": "yellow", "warning": "yellow"}.get(event.get("level", ""), "")
    return Text.assemble((timestamp(event["created_at"])[11:], "dim"), "  ", (event["message"], style))


def bar_fields(job: dict, losses: Losses) -> dict:
    progress = job.get("progress") or {}
    total = progress.get("total_steps")
    completed = total if job["status"] == "succeeded" and total else progress.get("step", 0)
    eta = None
    if job["status"] == "running" and job.get("estimated_finish"):
        eta = f"ETA {duration(job['estimated_finish'] - time.time())}"
    detail = "  ".join(filter(None, [losses.describe(), eta or ""]))
    return {"total": total, "completed": completed, "status": job["status"], "detail": escape(detail)}


def finish(job: dict, losses: Losses, console: Console | None) -> int:
    """Exit 0 for a job that succeeded; a failed or cancelled one says so on stderr (exit 1)."""
    if job["status"] == "failed":
        error = job.get("error") or {}
        raise ClientError(f"{job['id']} failed ({error.get('code')}): {error.get('message')}")
    if job["status"] == "cancelled":
        raise ClientError(f"{job['id']} was cancelled")
    if console is not None:
        console.print(Text(f"{job['id']} succeeded: {job['fine_tuned_model']}", style="bold"))
        if losses.describe():
            console.print(Text(f"final {losses.describe()}"))
        console.print(Text(f"Download the adapter with `tunequeue jobs download {job['id']}`"))
    return 0


# download


def download(client: Client, args) -> int:
    target = output_path(args.output, f"{args.job_id}-adapter.zip")  # the name in the server's Content-Disposition
    with client.stream("GET", f"{JOBS}/{args.job_id}/adapter") as response:
        size = int(response.headers.get("content-length") or 0) or None
        expected = response.headers.get("x-adapter-sha256") or None
        written, digest = save_atomically(response.iter_bytes(), target, size, expected)
    if args.json:
        print_json({"path": str(target), "bytes": written, "sha256": digest})
    else:
        print(target)
    return 0


def output_path(output: Path | None, name: str) -> Path:
    if output is None:
        return Path(name)
    if output.is_dir():
        return output / name
    if not output.parent.is_dir():
        raise ClientError(f"cannot write {output}: the folder {output.parent} does not exist")
    return output


def save_atomically(chunks: Iterator[bytes], target: Path, size: int | None, expected: str | None) -> tuple[int, str]:
    """Into a hidden file beside the target, then renamed over it: the target is never a partial download. The
    bytes are checked against the server's sha256 (X-Adapter-SHA256) before the rename."""
    partial = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
    digest = hashlib.sha256()
    written = 0
    try:
        with partial.open("xb") as out, transfer_progress() as progress:
            task = progress.add_task(escape(target.name), total=size)
            for chunk in chunks:
                out.write(chunk)
                digest.update(chunk)
                written += len(chunk)
                progress.advance(task, len(chunk))
            out.flush()
            os.fsync(out.fileno())
        if expected and digest.hexdigest() != expected:
            raise ClientError(
                f"the download's sha256 is {digest.hexdigest()}, not the server's {expected}: nothing was written"
            )
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return written, digest.hexdigest()


# export


def export(client: Client, args) -> int:
    """Ask for an export (docs/export.md), wait for it with its progress, then download its zip, checked against
    the server's sha256. An export that fails says why, with its figures when its fidelity was out of bounds."""
    body: dict[str, Any] = {"format": args.format}
    if args.format == "merged":
        body["dtype"] = args.dtype
    elif args.format == "gguf":
        body["quantization"] = args.quantization
    made = client.post(f"{JOBS}/{args.job_id}/exports", json=body)
    exports = f"{JOBS}/{args.job_id}/exports/{made['id']}"
    shown: tuple | None = None
    while made["status"] in ("queued", "running"):
        if not args.json and (made["status"], made.get("progress")) != shown:
            shown = (made["status"], made.get("progress"))
            print(f"{made['id']}: {made['status']}" + (f", {made['progress']}" if made.get("progress") else ""),
                  file=sys.stderr, flush=True)  # fmt: skip
        time.sleep(args.interval)
        made = client.get(exports)
    if made["status"] == "failed":
        raise ClientError(f"{made['id']} failed: {made.get('error')}")
    name = f"{args.job_id}-{args.format}-{made['id']}.zip"  # the name in the server's Content-Disposition
    target = output_path(args.output, name)
    with client.stream("GET", f"{exports}/content") as response:
        size = int(response.headers.get("content-length") or 0) or None
        written, digest = save_atomically(response.iter_bytes(), target, size, response.headers.get("x-export-sha256"))
    if args.json:
        print_json({**made, "path": str(target)})
    else:
        fidelity = made.get("fidelity") or {}
        if fidelity:
            print(f"held-out loss {fidelity['loss_merged']:.4f} against {fidelity['loss_trained']:.4f} as trained "
                  f"({fidelity['loss_drift']:.2%}); greedy answers the same: {fidelity['greedy_matches']}/"
                  f"{len(fidelity['samples'])}", file=sys.stderr)  # fmt: skip
        print(target)
    return 0


ACTIONS: dict[str, Callable[[Client, Any], int]] = {
    "create": create,
    "list": list_jobs,
    "get": get,
    "cancel": control,
    "pause": control,
    "resume": control,
    "watch": watch,
    "download": download,
    "export": export,
}

INTERRUPTED = {
    "watch": "stopped watching; the job is untouched and goes on (`tunequeue jobs watch {job}` follows it again)",
    "download": "nothing was written",
    "export": "nothing was written; the export goes on on the server (`tunequeue jobs export` again finds it)",
}
INTERRUPTED_REQUEST = "the request may or may not have reached the server"
