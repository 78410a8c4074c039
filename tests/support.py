"""Test support: tiny random models, service processes, and an HTTP client that waits for jobs."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tunequeue" / "sample"
TERMINAL = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)


def tiny_lora(tiny_model: Path, dtype=None, targets=("q_proj", "v_proj"), dropout: float = 0.0):
    """The tiny Llama (tied, frozen embeddings) under PEFT with LoRA r=4, its LoRA B non-zero so that every
    path carries gradient (PEFT starts B at zero)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype or torch.float32)
    base.config.use_cache = False
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=list(targets))
    model = get_peft_model(base, config)
    torch.manual_seed(0)
    for parameter in model.parameters():
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.05)
    return model


def build_tiny_model(tokenizer_source: Path, target: Path, **shape) -> Path:
    """A random Llama with the demo model's tokenizer and chat template: by default 2 layers, about 3M
    parameters; `shape` (LlamaConfig fields) builds another, such as SmolLM2-135M's."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    torch.manual_seed(0)
    config = LlamaConfig(
        **{"vocab_size": len(tokenizer), **(shape or TINY_LLAMA)},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


CLI_END = "\x1e\n"  # ends each command's output in `Stack.cli_many`
CLI_MANY = f"""import json, sys
from tunequeue.cli import main
for argv in json.loads(sys.argv[1]):
    code = main(argv)
    if code:
        sys.exit(code)
    print({CLI_END!r}, end="", flush=True)
"""


def key_command(tenant: str, admin: bool) -> list[str]:
    return ["keys", "create", "--tenant", tenant] + (["--admin"] if admin else [])


class Stack:
    """The API (uvicorn) and one Celery worker as real processes, on the settings in `env`."""

    def __init__(self, env: dict[str, str], logdir: Path):
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.logdir = logdir
        self.port = free_port()
        self.processes: list[subprocess.Popen] = []
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "tunequeue", *args], env=self.env, cwd=ROOT, capture_output=True, text=True
        )
        assert result.returncode == 0, f"tunequeue {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result

    def cli_many(self, *commands: list[str]) -> list[str]:
        """Several `tunequeue` commands in one process (one start-up instead of one each): their outputs."""
        result = subprocess.run(
            [sys.executable, "-c", CLI_MANY, json.dumps(commands)],
            env=self.env, cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 0, f"tunequeue {commands} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout.split(CLI_END)[: len(commands)]

    def create_key(self, tenant: str = "default", admin: bool = False) -> str:
        return self.cli(*key_command(tenant, admin)).stdout.strip()

    def prepare(self, model: Path | None, model_id: str) -> "Stack":
        """The database migrated, the base model imported and the stack's own key (tenant `default`, admin)."""
        imports = [["models", "import-hf", str(model), "--name", model_id]] if model is not None else []
        outputs = self.cli_many(["db", "upgrade"], *imports, key_command("default", admin=True))
        self.key = outputs[-1].strip()
        return self

    def start(self, worker: bool = True) -> "Stack":
        self.logdir.mkdir(parents=True, exist_ok=True)
        if not hasattr(self, "key"):
            self.key = self.create_key("default", admin=True)  # the stack's own client: tenant `default`, admin
        self.client.headers["Authorization"] = f"Bearer {self.key}"
        self._spawn(
            "api",
            [
                sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1", "--port", str(self.port),
                "--timeout-graceful-shutdown", "5",  # open event streams end the stop after 5 s, not 30
            ],
        )  # fmt: skip
        if worker:
            self.start_worker()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if self.client.get("/healthz").status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.3)
        raise RuntimeError(f"API did not start; see {self.logdir / 'api.log'}")

    def start_worker(self, name: str = "worker", *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """A worker process; `env` adds to the stack's settings for this worker only (e.g. its TMPDIR)."""
        return self._spawn(name, [sys.executable, "-m", "tunequeue", "worker", *args], env)

    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "ab")
        process = subprocess.Popen(
            command,
            env={**self.env, **(env or {})},
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        self.client.close()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.read_text()[-4000:]}" for p in sorted(self.logdir.glob("*.log")))

    # API helpers

    def upload(self, path: Path) -> dict:
        with open(path, "rb") as stream:
            response = self.client.post("/v1/files", files={"file": (path.name, stream)}, data={"purpose": "fine-tune"})
        assert response.status_code == 200, response.text
        return response.json()

    def create_job(self, **body) -> dict:
        response = self.client.post("/v1/fine_tuning/jobs", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    def wait(self, job_id: str, until=TERMINAL, timeout: float = 600, headers: dict | None = None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers).json()
            if job["status"] in until:
                return job
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s\n{self.logs()}")

    def wait_for_workers(self, count: int, timeout: float = 90) -> list[dict]:
        """Until `count` workers report their slots in heartbeats (submissions are checked against them)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            workers = [w for w in self.client.get("/admin/overview").json()["workers"] if w.get("slots")]
            if len(workers) >= count:
                return workers
            time.sleep(0.3)
        raise AssertionError(f"fewer than {count} workers reported their slots in {timeout}s\n{self.logs()}")


def training_processes(job_id: str) -> list[int]:
    """Pids of recipe processes working on `job_id` (their config lives in a folder named after it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "worker.training" in cmdline and job_id in cmdline:
            pids.append(int(entry.name))
    return pids


LOAD_AND_GENERATE = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
base_dir, adapter_dir, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
tokenizer = AutoTokenizer.from_pretrained(base_dir)
ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)["input_ids"]
def greedy(model):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()
base = AutoModelForCausalLM.from_pretrained(base_dir)
before = greedy(base)
tuned = PeftModel.from_pretrained(base, adapter_dir)
print(json.dumps({"base": before, "tuned": greedy(tuned), "type": type(tuned).__name__}))
"""


def generate_in_fresh_process(base_dir: Path, adapter_dir: Path, prompt: str) -> dict:
    """Load the adapter the way a user would, with plain peft, in a new Python process."""
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_GENERATE, str(base_dir), str(adapter_dir), prompt],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def extract_zip(data: bytes, target: Path) -> Path:
    import io
    import zipfile

    zipfile.ZipFile(io.BytesIO(data)).extractall(target)
    return target


def embedded_in_process(monkeypatch, data_dir: Path, tiny_model: Path | None = None, **settings: str) -> None:
    """This test process on the embedded defaults (SQLite, SQLAlchemy broker, local storage) under `data_dir`,
    with TUNEQUEUE_<NAME> settings, migrated, and the tiny model imported as `tiny-llama` if given."""
    monkeypatch.setenv("TUNEQUEUE_DATA_DIR", str(data_dir))
    for name, value in settings.items():
        monkeypatch.setenv(f"TUNEQUEUE_{name.upper()}", value)
    for key in ("TUNEQUEUE_DATABASE_URL", "TUNEQUEUE_BROKER_URL", "TUNEQUEUE_STORAGE_URL"):
        monkeypatch.delenv(key, raising=False)
    from shared import migrate
    from tunequeue.commands import models as cli

    migrate.upgrade()
    if tiny_model is not None:
        cli.register_folder(tiny_model, "tiny-llama", source="test")


def make_key(tenant: str, admin: bool = False) -> str:
    from shared.auth.service import create_key
    from shared.db import session_scope

    with session_scope() as session:
        return create_key(session, tenant, admin=admin)[1]


def heldout_evaluation(base: Path, data: Path, adapter: Path | None = None, generate: int = 0) -> dict:
    """Held-out loss and greedy answers from `python -m worker.training.evaluate`, in a child process."""
    args = ["--base", str(base), "--data", str(data), "--generate", str(generate)]
    result = python_m("worker.training.evaluate", args + (["--adapter", str(adapter)] if adapter is not None else []))
    assert result.returncode == 0, f"evaluation failed:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


_FORK_SERVER = None


def start_python_m(module: str, args: list[str], env: dict[str, str] | None = None):
    """`python -m module args…` (the recipe, an evaluation, an export) as the worker runs it: forked from a fork
    server (`worker.runner.warm.ForkServer`) that loaded the recipe's libraries once for the whole test session,
    with this process's environment and `env`. A `worker.runner.warm.ForkedProcess`: pid, pipes, wait, kill."""
    global _FORK_SERVER
    from worker.runner.warm import ForkServer

    if _FORK_SERVER is None or _FORK_SERVER.gone:
        _FORK_SERVER = ForkServer(sys.executable, dict(os.environ))
    process = _FORK_SERVER.fork({**os.environ, **(env or {})}, module, tuple(args))
    process.stdin.close()
    return process


def python_m(module: str, args: list[str], env: dict[str, str] | None = None, timeout: float = 300):
    """`start_python_m`, run to its end: a `subprocess.CompletedProcess` with its stdout and stderr."""
    process = start_python_m(module, args, env)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return subprocess.CompletedProcess([module, *args], process.returncode, stdout, stderr)
