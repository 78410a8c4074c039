"""`tunequeue files upload`: a training file to the server (POST /v1/files), streamed from disk with a bar of
the bytes sent. The file id alone goes to stdout."""

import sys
from pathlib import Path

from rich.markup import escape

from tunequeue.commands.client import SLOW_TIMEOUT, Client, ClientError, resolve_connection
from tunequeue.commands.terminal import EXIT_INTERRUPTED, print_json, transfer_progress


def run_files(args) -> int:
    try:
        with Client(resolve_connection(args.url, args.api_key)) as client:
            return upload(client, args.path, args.purpose, args.json)
    except KeyboardInterrupt:
        print("\nInterrupted: the upload was abandoned", file=sys.stderr)
        return EXIT_INTERRUPTED


def upload(client: Client, path: Path, purpose: str, as_json: bool) -> int:
    if not path.is_file():
        raise ClientError(f"no such file: {path}")
    with transfer_progress() as progress, path.open("rb") as raw:
        # rich's reader advances the bar as httpx reads each chunk to send it
        with progress.wrap_file(raw, total=path.stat().st_size, description=escape(path.name)) as stream:
            created = client.post(
                "/v1/files", files={"file": (path.name, stream)}, data={"purpose": purpose}, timeout=SLOW_TIMEOUT
            )
    if as_json:
        print_json(created)
        return 0
    print(created["id"])
    print(describe(created), file=sys.stderr)
    return 0


def describe(file: dict) -> str:
    report = file.get("validation") or {}
    found = f": {report['examples']:,} {report.get('format', '')} examples" if "examples" in report else ""
    return f"Uploaded {file['filename']} as {file['id']} ({file['bytes']:,} bytes){found}"
