"""What the GPU check needs: whether CUDA devices exist (asked once, in this process, which is neither a Celery
worker nor a recipe), a model with SmolLM2-135M-Instruct's shapes and random weights, the service on its
embedded defaults (SQLite, the SQLAlchemy broker, local storage: nothing else to run on a GPU machine), the
check's job run to the end with what it left behind (the environment of its recipe processes included),
held-out loss of an adapter loaded with plain PEFT, and the check's figures as Markdown rows for
docs/BENCHMARKS.md."""

import csv
import io
import json
import os
import statistics
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import ROOT, SAMPLE, Stack, build_tiny_model, extract_zip, training_processes, write_jsonl


def cuda_devices() -> tuple[int, str]:
    """(how many CUDA devices this process sees, why none if none)."""
    try:
        import torch
    except ImportError:
        return 0, "torch is not installed"
    if not torch.cuda.is_available():
        return 0, "no CUDA device: torch.cuda.is_available() is False"
    return torch.cuda.device_count(), ""


DEVICES, NO_CUDA = cuda_devices()
needs_cuda = pytest.mark.skipif(DEVICES == 0, reason=NO_CUDA or "no CUDA device")
# NCCL gives each rank its own GPU and refuses two ranks on one ("Duplicate GPU detected"), so a job on two
# devices needs two real ones.
needs_two_gpus = pytest.mark.skipif(
    DEVICES < 2,
    reason=NO_CUDA
    or f"needs 2 CUDA devices, found {DEVICES}: NCCL refuses two ranks on one GPU (Duplicate GPU detected)",
)

MODEL_ID = "smollm2-135m-shaped"
BENCHMARK_ROWS: list[str] = []  # printed at the end of the run (conftest.py)
VERSIONS: dict[str, str] = {}

# 64 sample chats (61 trained, 3 held out by the recipe's automatic split), 8 steps of batch 8. No LoRA
# dropout: its masks come from each device's own random generator, and the GPU run is compared with the CPU
# run of the same job. The rate is high for a short run on random weights, so that the adapter learns
# something measurable (held-out loss 10.8 → 8.4 on the CPU).
TRAIN_EXAMPLES = 64
JOB = {
    "model": MODEL_ID,
    "seed": 7,
    "hyperparameters": {"n_epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "n_checkpoints": 0},
    "lora_dropout": 0.0,
    "adapter_selection": "last",
}


# SmolLM2-135M-Instruct's architecture (the GGUF's config): the check trains the demo model's shapes, and so
# at its speed, without carrying its weights to the GPU machine.
SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    vocab_size=49152,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    tie_word_embeddings=True,
)


def build_smollm2_shaped_model(tokenizer_source: Path, target: Path) -> Path:
    """A Llama of SmolLM2-135M's shapes with random weights (bf16, like an imported model), with its tokenizer."""
    return build_tiny_model(tokenizer_source, target, **SMOLLM2_135M)


class RecipeEnvironments(threading.Thread):
    """Reads the environment of every recipe process of a job (torchrun's ranks too) while it runs, from
    /proc/<pid>/environ: what the worker actually handed each process, not what it meant to."""

    KEYS = ("CUDA_VISIBLE_DEVICES", "LOCAL_RANK", "RANK", "WORLD_SIZE", "DS_ACCELERATOR")

    def __init__(self, job_id: str):
        super().__init__(daemon=True, name=f"environ-{job_id}")
        self.job_id = job_id
        self.seen: dict[int, dict[str, str]] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.05):
            # Read again on every pass: a rank caught between torchrun's fork and its exec still shows
            # torchrun's command line and environment; the last reading is the process's own.
            for pid in training_processes(self.job_id):
                environ = read_environ(pid)
                if environ:  # empty once the process is exiting
                    self.seen[pid] = {k: environ[k] for k in self.KEYS if k in environ}

    def stop(self) -> dict[int, dict[str, str]]:
        self.stopped.set()
        self.join(timeout=5)
        return self.seen

    def ranks(self) -> list[dict[str, str]]:
        """The processes that train (under torchrun: the ranks, not torchrun itself), by rank."""
        trainers = [env for env in self.seen.values() if "LOCAL_RANK" in env] or list(self.seen.values())
        return sorted(trainers, key=lambda env: int(env.get("RANK", "0")))


def read_environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (entry.decode(errors="replace").partition("=") for entry in raw.split(b"\0") if entry)
    return {key: value for key, _, value in pairs}


HELDOUT_LOSS = """
import json, sys, torch
from pathlib import Path
from peft import PeftModel
from transformers import AutoModelForCausalLM
from worker.training.evaluate import heldout_loss
base, data, adapters = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
torch.manual_seed(0)
result = {}
for adapter in [None, *adapters]:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    result[adapter or "base"] = heldout_loss(model.eval(), base, data)[0]
print(json.dumps(result))
"""


def heldout_losses(base: Path, data: Path, adapters: list[Path]) -> dict[str, float]:
    """Held-out loss per trained token of the base and of each adapter on it, loaded with plain
    `PeftModel.from_pretrained` and computed in float32 on the CPU: the same arithmetic for every adapter, so
    that only their training differs. Runs in a child process that sees no GPU."""
    result = subprocess.run(
        [sys.executable, "-c", HELDOUT_LOSS, str(base), str(data), *map(str, adapters)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def median_tokens_per_second(rows: list[dict]) -> float:
    """Median over the steps after the first (which pays for CUDA's warm-up), as `make bench` counts."""
    speeds = [float(r["tokens_per_second"]) for r in rows if r.get("tokens_per_second") not in (None, "")]
    return statistics.median(speeds[1:] or speeds)


BENCHMARK_HEADER = (
    "| job | devices | GPU | compute | steps | tokens/s (median) | trained tokens | wall s | peak GPU MiB (rank 0) |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def benchmark_row(name: str, devices: int, gpu: str, manifest: dict, rows: list[dict]) -> str:
    metrics = manifest["metrics"]
    return (
        f"| {name} | {devices} | {gpu} | {manifest['compute_dtype']} | {metrics['step']} | "
        f"{median_tokens_per_second(rows):.0f} | {metrics['trained_tokens']} | {metrics['wall_seconds']} | "
        f"{metrics.get('peak_gpu_memory_mib', 'n/a')} |"
    )


def start_stack(root: Path, model: Path, *worker_args: str) -> Stack:
    """API + one worker (`tunequeue worker *worker_args`) on the embedded defaults under `root`."""
    for key in ("TUNEQUEUE_DATABASE_URL", "TUNEQUEUE_BROKER_URL", "TUNEQUEUE_STORAGE_URL"):
        os.environ.pop(key, None)
    env = {
        "TUNEQUEUE_DATA_DIR": str(root / "data"),
        "TUNEQUEUE_CANCEL_POLL_SECONDS": "0.5",
        "TUNEQUEUE_HEARTBEAT_SECONDS": "1",
        "NCCL_SOCKET_IFNAME": "lo",  # NCCL's bootstrap between the ranks on loopback, like everything the tests do
    }
    stack = Stack(env, root / "logs")
    stack.cli("db", "upgrade")
    stack.cli("models", "import-hf", str(model), "--name", MODEL_ID)
    stack.start(worker=False)
    stack.start_worker("worker", *worker_args)
    stack.wait_for_workers(1)
    return stack


@dataclass
class FinishedJob:
    job: dict
    adapter: Path
    manifest: dict
    rows: list[dict]  # the job's results file: one row per step
    devices: list[str]  # the worker's device slots it held (device_usage)
    environments: RecipeEnvironments  # of its recipe processes, read while they ran


def run_job(stack: Stack, folder: Path, **options) -> FinishedJob:
    """The check's job (JOB, with `options`) through the API, to the end, with what it left behind."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = (SAMPLE / "train.jsonl").read_text().splitlines()[:TRAIN_EXAMPLES]
    data = write_jsonl(folder / "train.jsonl", [json.loads(line) for line in lines])
    job = stack.create_job(**JOB, training_file=stack.upload(data)["id"], **options)
    environments = RecipeEnvironments(job["id"])
    environments.start()
    try:
        done = stack.wait(job["id"], timeout=300)
    finally:
        environments.stop()
    assert done["status"] == "succeeded", (done["error"], stack.logs())
    adapter = extract_zip(stack.client.get(f"/v1/fine_tuning/jobs/{job['id']}/adapter").content, folder / "adapter")
    results = stack.client.get(f"/v1/files/{done['result_files'][0]}/content")
    assert results.status_code == 200, results.text
    return FinishedJob(
        job=done,
        adapter=adapter,
        manifest=json.loads((adapter / "manifest.json").read_text()),
        rows=list(csv.DictReader(io.StringIO(results.text))),
        devices=device_usage(stack, job["id"]),
        environments=environments,
    )


def device_usage(stack: Stack, job_id: str) -> list[str]:
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{stack.env['TUNEQUEUE_DATA_DIR']}/tunequeue.db")
    try:
        with engine.connect() as connection:
            query = text("SELECT device FROM device_usage WHERE job_id = :job ORDER BY device")
            return [row.device for row in connection.execute(query, {"job": job_id})]
    finally:
        engine.dispose()
