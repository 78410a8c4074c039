"""`tunequeue demo` (what `make demo` runs): import the demo model, start the API and a worker, upload the
sample data, fine-tune, follow it with a progress bar, download the adapter, then show the job's evaluation and
the base and tuned models' answers through the service's own /v1/chat/completions."""

import concurrent.futures
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
            compare(client, job)
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
    from tunequeue.commands.processes import inference_worker_command, worker_command

    logs = get_settings().resolved_data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"Starting the API on port {port}, a training worker and an inference worker (logs in {logs})")
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1", "--port", str(port)],
        stdout=open(logs / "api.log", "ab"),
        stderr=subprocess.STDOUT,
    )
    worker = subprocess.Popen(worker_command(), stdout=open(logs / "worker.log", "ab"), stderr=subprocess.STDOUT)
    inference = subprocess.Popen(
        inference_worker_command(), stdout=open(logs / "inference.log", "ab"), stderr=subprocess.STDOUT
    )
    return [api, worker, inference]


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


DEMO_PROMPTS = 4


def heldout_prompts(n: int = DEMO_PROMPTS) -> list[str]:
    """The first user turns of the held-out examples: questions the model never trained on."""
    lines = (SAMPLE / "heldout.jsonl").read_text().splitlines()[:n]
    return [next(m["content"] for m in json.loads(line)["messages"] if m["role"] == "user") for line in lines]


def ask(client: httpx.Client, model: str, prompt: str, stream: bool = False) -> str:
    """One greedy answer through the service's /v1/chat/completions; streamed to the terminal if `stream`."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 40, "temperature": 0}
    if not stream:
        response = client.post("/v1/chat/completions", json=body, timeout=600)
        retries = 3
        # 429: over the tenant's completions in flight; 503: no worker could take it yet. Wait, as SDKs do.
        while response.status_code == 429 or (response.status_code == 503 and retries > 0):
            retries -= response.status_code == 503
            time.sleep(float(response.headers.get("Retry-After", "2")))
            response = client.post("/v1/chat/completions", json=body, timeout=600)
        response.raise_for_status()
        return response.json()["choices"][0]["message"]["content"]
    answer = []
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            piece = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if piece:
                answer.append(piece)
                print(piece, end="", flush=True)
    print()
    return "".join(answer)


def compare(client: httpx.Client, job: dict) -> None:
    """The job's own evaluation, then base and tuned answers to held-out questions, both served by the
    inference worker through chat.completions, and one tuned answer streamed as it is generated."""
    evaluation = client.get(f"/v1/fine_tuning/jobs/{job['id']}/evaluation")
    if evaluation.status_code == 200:
        scores = evaluation.json()
        base, tuned = scores["base"], scores["tuned"]
        print(
            f"\nEvaluation on the validation set: loss {base['loss']:.3f} (base) -> {tuned['loss']:.3f} (tuned), "
            f"token accuracy {base['token_accuracy']:.1%} -> {tuned['token_accuracy']:.1%}"
        )
    print(f"\nAnswers through /v1/chat/completions: {DEMO_MODEL_ID} and {job['fine_tuned_model']}")
    prompts = heldout_prompts()
    asked = [(model, p) for p in prompts for model in (DEMO_MODEL_ID, job["fine_tuned_model"])]
    # Sent at once: the inference worker decodes those admitted together as one batch on one base, with and
    # without the adapter (a tenant has TUNEQUEUE_INFERENCE_CONCURRENCY_PER_TENANT in flight; the rest wait).
    with concurrent.futures.ThreadPoolExecutor(len(asked)) as pool:
        answers = list(pool.map(lambda pair: ask(client, *pair), asked))
    tuned_parrots = 0
    for prompt, base_answer, tuned_answer in zip(prompts, answers[::2], answers[1::2], strict=True):
        print(f"\nQ: {prompt}\n  base : {base_answer}\n  tuned: {tuned_answer}")
        tuned_parrots += "Squawk" in tuned_answer
    print(f"\nTuned answers in the parrot's voice: {tuned_parrots}/{DEMO_PROMPTS}")
    question = "What is the capital of Peru?"
    print(f"\nStreamed from the tuned model, token by token:\nQ: {question}\nA: ", end="", flush=True)
    ask(client, job["fine_tuned_model"], question, stream=True)
