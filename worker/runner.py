"""Runs one claimed job: builds the recipe's config from the job row, runs the recipe in a child process in
its own process group, turns its reports into fenced DB writes, uploads checkpoints and the adapter, and
finishes the job. Whatever happens, the job leaves `running` through this module."""

import csv
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import deque
from pathlib import Path

from shared.basemodels.service import ensure_local_copy, get_base_model
from shared.db import session_scope
from shared.files.models import File
from shared.files.service import create_result_file
from shared.jobs import execution
from shared.jobs.models import Job
from shared.jobs.service import fine_tuned_model_name
from shared.settings import get_settings
from shared.storage import get_storage
from worker.training.reporter import parse_line

PAUSED_EXIT_CODE = 3  # worker.training.recipe.PAUSED_EXIT_CODE; importing it would import torch here

log = logging.getLogger("tunequeue.worker")
STOP_GRACE_SECONDS = 5


class JobRunner:
    def __init__(self, job_id: str, attempt: int, worker: str):
        self.job_id, self.attempt, self.worker = job_id, attempt, worker
        self.settings = get_settings()
        self.storage = get_storage()
        self.error: dict | None = None
        self.done: dict | None = None
        self.metrics_rows: list[dict] = []
        self.paused: dict | None = None
        self.reporting = False
        self.stderr_tail: deque[str] = deque(maxlen=40)
        self._last_metrics_write = 0.0
        self._pending_metrics: dict | None = None

    def run(self) -> None:
        with tempfile.TemporaryDirectory(prefix=f"tunequeue-{self.job_id}-") as scratch:
            workdir = Path(scratch)
            config = self.prepare(workdir)
            returncode = self.run_recipe(config, workdir / "out")
            self.finish(returncode, workdir)

    def prepare(self, workdir: Path) -> Path:
        with session_scope() as session:
            job = session.get(Job, self.job_id)
            assert job is not None
            base = get_base_model(session, job.model)
            files = {"train": session.get(File, job.training_file)}
            if job.validation_file:
                files["validation"] = session.get(File, job.validation_file)
            resume = (job.resume_key, job.resume_sha256) if job.resume_key else None
            tenant, model_id, options, hyper, seed = (
                job.tenant,
                job.model,
                job.training_options,
                job.hyperparameters,
                job.seed,
            )
            sources = {name: (f.storage_key, f.sha256) for name, f in files.items() if f is not None}
        execution_event(self, "Preparing base model and training data")
        model_path = ensure_local_copy(base, self.storage, self.settings.resolved_model_dir)
        paths = {}
        for name, (key, sha256) in sources.items():
            paths[name] = workdir / f"{name}.jsonl"
            if self.storage.download(key, paths[name]) != sha256:
                raise RuntimeError(f"the {name} file failed its checksum")
        self.tenant = tenant
        resume_from = self.fetch_resume_state(workdir, *resume) if resume else None
        recipe_hyperparameters = {k: v for k, v in hyper.items() if k != "learning_rate_multiplier"}
        config = {
            "base_model_path": str(model_path),
            "base_model_id": model_id,
            "train_file": str(paths["train"]),
            "validation_file": str(paths["validation"]) if "validation" in paths else None,
            "job_id": self.job_id,
            "dataset_sha256": sources["train"][1],
            "seed": seed,
            "hyperparameters": hyper,
            "checkpoint_every_steps": self.settings.checkpoint_every_steps,
            "resume_from": str(resume_from) if resume_from else None,
            **recipe_hyperparameters,
            **options,
        }
        path = workdir / "config.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def fetch_resume_state(self, workdir: Path, key: str, sha256: str) -> Path:
        """The state a pause saved, checked against the sha256 recorded with it."""
        archive = workdir / "resume.zip"
        if self.storage.download(key, archive) != sha256:
            raise RuntimeError("the saved training state failed its checksum")
        folder = workdir / "resume"
        zipfile.ZipFile(archive).extractall(folder)
        self.metrics_rows = json.loads((folder / "metrics_rows.json").read_text())
        return folder

    def run_recipe(self, config: Path, out: Path) -> int:
        python = self.settings.training_python or sys.executable
        command = [python, "-m", "worker.training", "--config", str(config), "--out", str(out)]
        # Own session = own process group: cancel kills the recipe and anything it started, and a
        # Ctrl-C meant for the worker does not reach the recipe first.
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"},
        )
        readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in readers:
            reader.start()
        self.cancelled = self.pausing = False
        while self.process.poll() is None:
            time.sleep(self.settings.cancel_poll_seconds)
            self._flush_metrics(force=False)
            with session_scope() as session:
                flags = execution.control_flags(session, self.job_id, self.attempt)
            if flags.stop:
                self.cancelled = True
                self.stop_recipe()
            elif flags.pause and not self.pausing and self.reporting:  # its handler is in place once it reports
                # The recipe finishes its step, saves its whole state and exits with PAUSED_EXIT_CODE.
                self.pausing = True
                os.kill(self.process.pid, signal.SIGUSR1)
        for reader in readers:
            reader.join(timeout=10)
        self._flush_metrics(force=True)
        return self.process.returncode

    def stop_recipe(self) -> None:
        for sig, wait in ((signal.SIGTERM, STOP_GRACE_SECONDS), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            event = parse_line(line.rstrip("\n"))
            if event is None:
                log.info("[%s] %s", self.job_id, line.rstrip())
                continue
            try:
                self.handle(event)
            except Exception:  # a failed DB write must not kill the reader; the job still finishes
                log.exception("could not record event %s of %s", event.get("event"), self.job_id)

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr_tail.append(line.rstrip())

    def handle(self, event: dict) -> None:
        self.reporting = True
        kind = event.pop("event")
        if kind == "metrics":
            self.metrics_rows.append(event)
            self._pending_metrics = event
            self._flush_metrics(force=event["step"] in (1, event["total_steps"]))
        elif kind == "checkpoint":
            self.upload_checkpoint(event)
        elif kind == "message":
            execution_event(self, event["message"])
        elif kind == "done":
            self.done = event
        elif kind == "paused":
            self.paused = event
        elif kind == "error":
            self.error = event

    def _flush_metrics(self, force: bool) -> None:
        pending = self._pending_metrics
        interval = self.settings.metrics_interval_seconds
        if pending is None or (not force and time.monotonic() - self._last_metrics_write < interval):
            return
        self._pending_metrics = None
        self._last_metrics_write = time.monotonic()
        with session_scope() as session:
            execution.record_metrics(session, self.job_id, self.attempt, pending)

    def save_paused_state(self, folder: Path) -> None:
        step = self.paused["step"]
        (folder / "metrics_rows.json").write_text(json.dumps(self.metrics_rows))
        key = f"tenants/{self.tenant}/jobs/{self.job_id}/attempt-{self.attempt}/resume-step-{step}.zip"
        _, sha256 = self.storage.put_bytes(key, zip_folder(folder))
        with session_scope() as session:
            execution.record_checkpoint(
                session,
                self.job_id,
                self.attempt,
                step=step,
                metrics=self.paused["metrics"],
                storage_key=key,
                sha256=sha256,
            )
            execution.pause_job(session, self.job_id, self.attempt, step=step, resume_key=key, resume_sha256=sha256)

    def upload_checkpoint(self, event: dict) -> None:
        step = event["step"]
        key = f"tenants/{self.tenant}/jobs/{self.job_id}/attempt-{self.attempt}/checkpoints/step-{step}.zip"
        _, sha256 = self.storage.put_bytes(key, zip_folder(Path(event["path"])))
        with session_scope() as session:
            execution.record_checkpoint(
                session, self.job_id, self.attempt, step=step, metrics=event["metrics"], storage_key=key, sha256=sha256
            )

    def finish(self, returncode: int, workdir: Path) -> None:
        if self.cancelled:
            with session_scope() as session:
                execution.cancel_running_job(session, self.job_id, self.attempt)
            return
        if returncode == PAUSED_EXIT_CODE and self.paused is not None:
            self.save_paused_state(Path(self.paused["path"]))
            return
        if returncode != 0 or self.done is None:
            raise RecipeFailed(self.error, returncode, list(self.stderr_tail))
        adapter = zip_folder(Path(self.done["adapter"]))
        key = f"tenants/{self.tenant}/jobs/{self.job_id}/attempt-{self.attempt}/adapter.zip"
        _, sha256 = self.storage.put_bytes(key, adapter)
        final = self.done["metrics"]
        keys = (
            "train_loss",
            "train_mean_token_accuracy",
            "valid_loss",
            "valid_mean_token_accuracy",
            "full_valid_loss",
            "full_valid_mean_token_accuracy",
        )
        with session_scope() as session:
            job = session.get(Job, self.job_id)
            assert job is not None
            # The delivered adapter is the newest checkpoint, with the final (full validation) metrics.
            execution.record_checkpoint(
                session,
                self.job_id,
                self.attempt,
                step=final["step"],
                metrics={k: final[k] for k in keys if final.get(k) is not None},
                storage_key=key,
                sha256=sha256,
            )
            results = create_result_file(
                session,
                self.storage,
                tenant=self.tenant,
                job_id=self.job_id,
                filename=f"{self.job_id}_results.csv",
                data=metrics_csv(self.metrics_rows),
            )
            execution.succeed_job(
                session,
                self.job_id,
                self.attempt,
                fine_tuned_model=fine_tuned_model_name(job),
                trained_tokens=self.done["trained_tokens"],
                adapter_key=key,
                adapter_sha256=sha256,
                result_files=[results.id],
                message=f"The job has successfully completed: {fine_tuned_model_name(job)}",
            )


class RecipeFailed(Exception):
    def __init__(self, error: dict | None, returncode: int, stderr_tail: list[str]):
        self.code = (error or {}).get("code") or ("worker_killed" if returncode < 0 else "training_error")
        message = (error or {}).get("message")
        if not message:
            last = next((line for line in reversed(stderr_tail) if line.strip()), "")
            message = f"the training process exited with code {returncode}" + (f": {last}" if last else "")
        self.param = (error or {}).get("param")
        super().__init__(message)


def execution_event(runner: JobRunner, message: str) -> None:
    with session_scope() as session:
        execution.add_event(session, runner.job_id, runner.attempt, message)


def zip_folder(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder))
    return buffer.getvalue()


def metrics_csv(rows: list[dict]) -> bytes:
    # OpenAI's result-file columns first, then tunequeue's.
    columns = [
        "step",
        "train_loss",
        "train_accuracy",
        "valid_loss",
        "valid_mean_token_accuracy",
        "epoch",
        "learning_rate",
        "grad_norm",
        "tokens_per_second",
    ]
    rows = [{**row, "train_accuracy": row.get("train_mean_token_accuracy")} for row in rows]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()
