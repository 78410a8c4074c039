"""`tunequeue demo` (what `make demo` runs): import the demo model, start the API and a worker, upload the
sample data, fine-tune, follow it with a progress bar, download the adapter, compare base and tuned answers."""

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path

import httpx
from tqdm import tqdm

from shared.basemodels.demo import DEMO_MODEL_ID
from shared.settings import get_settings
from tunequeue.console import Refused

# The sample data ships inside the package, so the demo runs from any working directory.
SAMPLE = Path(str(files("tunequeue") / "sample"))


def run(port: int | None, epochs: int) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll would break the progress bar
    started = time.monotonic()
    port = claim_port(port)
    ensure_model()
    base_url = f"http://127.0.0.1:{port}"
    processes = start_services(port)
    try:
        with demo_key() as secret:  # revoked when the demo ends, however it ends (Ctrl-C included)
            client = httpx.Client(base_url=base_url, timeout=60, headers={"Authorization": f"Bearer {secret}"})
            wait_ready(client, api=processes[0])
            job = submit(client, epochs)
            job = follow(client, job["id"])
            if job["status"] != "succeeded":
                print(f"\nThe job ended {job['status']}: {job.get('error')}")
                return 1
            report = job.get("validation_report") or {}
            length = report.get("length") or {}
            print(
                f"Validation report: {report.get('examples')} examples, {report.get('total_tokens')} tokens "
                f"({report.get('loss_tokens')} trained), length p50/p95/max "
                f"{length.get('p50')}/{length.get('p95')}/{length.get('max')} tokens"
            )
            adapter = download(client, job["id"])
            metrics = json.loads((adapter / "manifest.json").read_text())["metrics"]
            if "initial_valid_loss" in metrics:
                print(
                    f"valid_loss on the held-out 5%: {metrics['initial_valid_loss']:.3f} before training -> "
                    f"{metrics['full_valid_loss']:.3f} after (adapter from step {metrics['adapter']['step']})"
                )
            compare(adapter)
            print(f"\nDemo finished in {time.monotonic() - started:.0f} s. Adapter: {adapter}")
            return 0
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def claim_port(port: int | None) -> int:
    """A free port, unless one is asked for; a port already taken (say, by a demo left running) is refused
    rather than talked to."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port or 0))
        except OSError as exc:
            raise Refused(
                f"port {port} is already in use (a demo or server left running?): stop it, or pass another --port"
            ) from exc
        return probe.getsockname()[1]


def ensure_model() -> None:
    from shared import migrate

    migrate.upgrade()
    from shared.basemodels.models import BaseModelRecord
    from shared.db import session_scope

    with session_scope() as session:
        present = session.get(BaseModelRecord, DEMO_MODEL_ID) is not None
    if not present:
        subprocess.run([sys.executable, "-m", "tunequeue", "models", "import-demo"], check=True)


def start_services(port: int) -> list[subprocess.Popen]:
    from tunequeue.commands.processes import worker_command

    logs = get_settings().resolved_data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"Starting the API on port {port} and one worker (logs in {logs})")
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1", "--port", str(port)],
        stdout=open(logs / "api.log", "ab"),
        stderr=subprocess.STDOUT,
    )
    worker = subprocess.Popen(worker_command(), stdout=open(logs / "worker.log", "ab"), stderr=subprocess.STDOUT)
    return [api, worker]


@contextmanager
def demo_key() -> Iterator[str]:
    """The demo's own key (tenant `demo`), revoked when the demo ends: a demo leaves no working key behind.
    Like every key, only its hash is stored."""
    from shared.auth.service import create_key, revoke_key
    from shared.db import session_scope

    with session_scope() as session:
        key, secret = create_key(session, "demo", name="make demo")
        key_id = key.id
    try:
        yield secret
    finally:
        with session_scope() as session:
            revoke_key(session, key_id)


def wait_ready(client: httpx.Client, api: subprocess.Popen, timeout: float = 60) -> None:
    logs = get_settings().resolved_data_dir / "logs" / "api.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if api.poll() is not None:
            raise Refused(f"the demo's API server exited with code {api.returncode}; see {logs}")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise Refused(f"the API did not become ready within {timeout:.0f} s; see {logs}")


def submit(client: httpx.Client, epochs: int) -> dict:
    with open(SAMPLE / "train.jsonl", "rb") as stream:
        uploaded = client.post("/v1/files", files={"file": ("train.jsonl", stream)}, data={"purpose": "fine-tune"})
    uploaded.raise_for_status()
    print(f"Uploaded {SAMPLE / 'train.jsonl'} as {uploaded.json()['id']}")
    body = {
        "model": DEMO_MODEL_ID,
        "training_file": uploaded.json()["id"],
        "suffix": "parrot",
        "seed": 7,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": epochs}}},
    }
    response = client.post("/v1/fine_tuning/jobs", json=body)
    response.raise_for_status()
    job = response.json()
    print(f"Submitted {job['id']}: {job['hyperparameters']}")
    return job


def follow(client: httpx.Client, job_id: str) -> dict:
    bar = tqdm(total=1, desc="queued", unit="step", dynamic_ncols=True)
    while True:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        progress = job.get("progress") or {}
        if progress:
            bar.total = progress["total_steps"]
            bar.n = progress["step"]
            bar.set_description(f"{job['status']} epoch {progress['epoch']}")
            bar.set_postfix(loss=f"{progress['train_loss']:.3f}", tok_s=f"{progress['tokens_per_second']:.0f}")
        else:
            bar.set_description(job["status"])
        bar.refresh()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            bar.close()
            return job
        time.sleep(1)


def download(client: httpx.Client, job_id: str) -> Path:
    target = get_settings().resolved_data_dir / "adapters" / job_id
    target.mkdir(parents=True, exist_ok=True)
    response = client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter")
    response.raise_for_status()
    with tempfile.NamedTemporaryFile(suffix=".zip") as archive:
        archive.write(response.content)
        archive.flush()
        zipfile.ZipFile(archive.name).extractall(target)
    print(f"Downloaded the adapter ({len(response.content):,} bytes): {sorted(os.listdir(target))}")
    return target


def evaluate(base: Path, data: Path, adapter: Path | None = None, generate: int = 0) -> dict:
    """Held-out loss and greedy answers, in a child process (this one never imports torch)."""
    command = [
        sys.executable,
        "-m",
        "worker.training.evaluate",
        "--base",
        str(base),
        "--data",
        str(data),
        "--generate",
        str(generate),
    ]
    if adapter is not None:
        command += ["--adapter", str(adapter)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"evaluation failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare(adapter: Path) -> None:
    base = get_settings().resolved_model_dir / DEMO_MODEL_ID
    heldout = SAMPLE / "heldout.jsonl"
    results = {"base": evaluate(base, heldout, generate=5), "tuned": evaluate(base, heldout, adapter, generate=5)}
    print(
        f"\nHeld-out loss (assistant tokens, {results['base']['tokens']} tokens): "
        f"base {results['base']['loss']:.3f} -> tuned {results['tuned']['loss']:.3f}\n"
    )
    for prompt, before, after in zip(
        results["base"]["prompts"], results["base"]["generations"], results["tuned"]["generations"], strict=True
    ):
        print(f"Q: {prompt}\n  base : {before}\n  tuned: {after}\n")
    stopped = {name: sum(r["stopped"]) for name, r in results.items()}
    print(f"Answers that ended their turn (EOS within 40 tokens): base {stopped['base']}/5, tuned {stopped['tuned']}/5")
