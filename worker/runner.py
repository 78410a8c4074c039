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
from shared.db import retrying, session_scope
from shared.files.models import File
from shared.files.service import create_result_file
from shared.jobs import execution, state
from shared.jobs.models import Job
from shared.jobs.service import fine_tuned_model_name
from shared.settings import get_settings
from shared.storage import StorageError, download_verified, get_storage, put_verified, with_retries
from worker.slots import Lease
from worker.training.control import PAUSE_FILE_ENV
from worker.training.reporter import parse_line

PAUSED_EXIT_CODE = 3  # worker.training.recipe.PAUSED_EXIT_CODE; importing it would import torch here

log = logging.getLogger("tunequeue.worker")
STOP_GRACE_SECONDS = 5
# Set when the worker is asked to shut down (SIGTERM): running jobs checkpoint and go back to the queue.
SHUTDOWN = threading.Event()


class RetryAttempt(Exception):
    """This attempt ended for a reason that is not the job's fault (its process was killed, storage or the
    database failed, the worker is shutting down): requeue the job for another attempt."""

    def __init__(self, reason: str, code: str = "worker_lost"):
        super().__init__(reason)
        self.code = code


class LeaseKeeper(threading.Thread):
    """Renews the attempt's lease while the worker holds the job, from the claim (so downloading a large base
    model counts too) to the end. `lost` is set once the attempt is no longer the job's."""

    def __init__(self, job_id: str, attempt: int, lease_seconds: float):
        super().__init__(daemon=True, name=f"lease-{job_id}")
        self.job_id, self.attempt, self.lease_seconds = job_id, attempt, lease_seconds
        self.stopped, self.lost = threading.Event(), threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.lease_seconds / 4):
            try:
                with session_scope() as session:
                    if not execution.renew_lease(session, self.job_id, self.attempt, self.lease_seconds):
                        self.lost.set()
                        return
            except Exception as exc:  # the database is away: keep training, keep trying
                log.warning("could not renew the lease of %s: %s", self.job_id, exc)

    def stop(self) -> None:
        self.stopped.set()


class JobRunner:
    def __init__(self, job_id: str, attempt: int, worker: str, lease: "Lease | None" = None):
        self.job_id, self.attempt, self.worker = job_id, attempt, worker
        self.device_env = lease.environment() if lease is not None else {}
        self.devices = len(lease.ids) if lease is not None else 1
        if lease is not None and lease.kind == "cpu" and self.devices > 1:
            self.device_env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed on CPU slots: gloo between the ranks
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
        self.cancelled = self.pausing = self.draining = False
        self.lease = LeaseKeeper(job_id, attempt, self.settings.lease_seconds)

    @property
    def prefix(self) -> str:
        """Every object this attempt writes lives under its own prefix; only a fenced DB write promotes one."""
        return f"tenants/{self.tenant}/jobs/{self.job_id}/attempt-{self.attempt}"

    def run(self) -> None:
        self.lease.start()
        try:
            with tempfile.TemporaryDirectory(prefix=f"tunequeue-{self.job_id}-") as scratch:
                workdir = Path(scratch)
                try:
                    config = self.prepare(workdir)
                except StorageError as exc:
                    raise RetryAttempt(
                        f"Attempt {self.attempt} could not fetch its inputs: {exc}", "storage_error"
                    ) from exc
                if SHUTDOWN.is_set():
                    raise RetryAttempt(f"Worker {self.worker} is shutting down")
                returncode = self.run_recipe(config, workdir / "out")
                self.finish(returncode, workdir)
        finally:
            self.lease.stop()

    def prepare(self, workdir: Path) -> Path:
        with session_scope() as session:
            job = session.get(Job, self.job_id)
            assert job is not None
            base = get_base_model(session, job.model)
            files = {"train": session.get(File, job.training_file)}
            if job.validation_file:
                files["validation"] = session.get(File, job.validation_file)
            checkpoint = execution.newest_resumable_checkpoint(session, self.job_id)
            resume = (checkpoint.storage_key, checkpoint.sha256, checkpoint.step) if checkpoint else None
            tenant, model_id, options, hyper, seed = (
                job.tenant,
                job.model,
                job.training_options,
                job.hyperparameters,
                job.seed,
            )
            sources = {name: (f.storage_key, f.sha256) for name, f in files.items() if f is not None}
        self.tenant = tenant
        execution_event(self, "Preparing base model and training data")
        tries = self.settings.storage_retries
        model_path = with_retries(
            lambda: ensure_local_copy(base, self.storage, self.settings.resolved_model_dir), "fetching the base", tries
        )
        paths = {}
        for name, (key, sha256) in sources.items():
            paths[name] = workdir / f"{name}.jsonl"
            download_verified(self.storage, key, paths[name], sha256, tries)
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
            "checkpoint_every_minutes": self.settings.checkpoint_every_minutes,
            "resume_from": str(resume_from) if resume_from else None,
            **recipe_hyperparameters,
            **options,
        }
        path = workdir / "config.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def fetch_resume_state(self, workdir: Path, key: str, sha256: str, step: int) -> Path:
        """The newest checkpoint with full training state, loaded only if its sha256 is the one in the DB."""
        archive = workdir / "resume.zip"
        download_verified(self.storage, key, archive, sha256, self.settings.storage_retries)
        folder = workdir / "resume"
        zipfile.ZipFile(archive).extractall(folder)
        rows = json.loads((folder / "metrics_rows.json").read_text())
        self.metrics_rows = [row for row in rows if row["step"] <= step]
        execution_event(self, f"Resuming from the checkpoint at step {step} (sha256 verified)")
        return folder

    def run_recipe(self, config: Path, out: Path) -> int:
        python = self.settings.training_python or sys.executable
        recipe = ["-m", "worker.training", "--config", str(config), "--out", str(out)]
        self.pause_file = out.parent / "pause-requested"
        if self.devices > 1:  # one process per device, trained together by DeepSpeed
            port = free_port()
            command = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(self.devices)]
            command += ["--master_addr", "127.0.0.1", "--master_port", str(port), *recipe]
        else:
            command = [python, *recipe]
        # Own session = own process group: cancel kills the recipe and anything it started, and a
        # Ctrl-C meant for the worker does not reach the recipe first.
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            start_new_session=True,
            preexec_fn=die_with_this_worker,
            env={
                **os.environ,
                "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "TUNEQUEUE_PARENT_PID": str(os.getpid()),  # the recipe dies with this worker (PDEATHSIG)
                PAUSE_FILE_ENV: str(self.pause_file),
                **self.device_env,  # its own devices only
            },
        )
        readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in readers:
            reader.start()
        while self.process.poll() is None:
            time.sleep(self.settings.cancel_poll_seconds)
            try:
                self._flush_metrics(force=False)
                with session_scope() as session:
                    flags = execution.control_flags(session, self.job_id, self.attempt)
            except Exception as exc:  # the database is away: the recipe trains on, the lease says how long
                log.warning("could not poll the controls of %s: %s", self.job_id, exc)
                flags = execution.ControlFlags(stop=False, pause=False)
            if flags.stop or self.lease.lost.is_set():
                self.cancelled = True
                self.stop_recipe()
            elif SHUTDOWN.is_set() and not self.draining:
                self.draining = True
                if self.reporting:
                    self.request_state_save()
                else:  # still loading: nothing worth saving yet
                    self.stop_recipe()
            elif flags.pause and not self.pausing:  # honoured after the recipe's next step
                self.request_state_save()
        for reader in readers:
            reader.join(timeout=10)
        self._flush_metrics(force=True)
        return self.process.returncode

    def request_state_save(self) -> None:
        """The recipe (every rank of it) finishes its step, saves its whole state, reports "paused" and exits.
        A file, not a signal: torchrun would not pass SIGUSR1 on to the ranks."""
        if not self.pausing:
            self.pausing = True
            self.pause_file.touch()

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

    def save_state_checkpoint(self, event: dict, name: str = "step") -> tuple[int, str, str | None]:
        """Upload the recipe's saved state (with the metrics so far) and record it as a resumable checkpoint.
        A pause or a shutdown saves under its own name: it may land on the step of a periodic checkpoint,
        and an object, once recorded with its sha256, is never overwritten."""
        step = event["step"]
        folder = Path(event["path"])
        (folder / "metrics_rows.json").write_text(json.dumps(self.metrics_rows))
        key = f"{self.prefix}/checkpoints/{name}-{step}.zip"
        return step, key, self.promote_checkpoint(step, event["metrics"], zip_folder(folder), key)

    def promote_checkpoint(self, step: int, metrics: dict, data: bytes, key: str) -> str | None:
        """Write the object, read it back, write its completion marker, then record it in the DB (fenced). A
        stale attempt's upload is deleted again: it never becomes a checkpoint."""
        tries = self.settings.storage_retries
        sha256 = put_verified(self.storage, key, data, tries)
        marker = json.dumps({"key": key, "sha256": sha256, "bytes": len(data), "step": step}).encode()
        put_verified(self.storage, f"{key}.complete", marker, tries)
        recorded = retrying(
            lambda session: (
                execution.record_checkpoint(
                    session,
                    self.job_id,
                    self.attempt,
                    step=step,
                    metrics=metrics,
                    storage_key=key,
                    sha256=sha256,
                    resumable=True,
                )
                is not None
            ),
            f"recording checkpoint {step} of {self.job_id}",
        )
        if not recorded:
            self.discard(key, f"{key}.complete")
            return None
        return sha256

    def discard(self, *keys: str) -> None:
        for key in keys:
            try:
                self.storage.delete(key)
            except Exception:
                log.exception("could not delete %s", key)

    def upload_checkpoint(self, event: dict) -> None:
        self.save_state_checkpoint(event)

    def finish(self, returncode: int, workdir: Path) -> None:
        if self.cancelled:
            # Cancelled by the user, or this attempt is stale (reaped): the fenced write settles which.
            retrying(
                lambda session: execution.cancel_running_job(session, self.job_id, self.attempt),
                f"cancelling {self.job_id}",
            )
            return
        # One process exits PAUSED_EXIT_CODE after a pause; ranks under torchrun exit 0 (torchrun fails a run
        # on any other code): the "paused" event without a "done" is what tells.
        if self.paused is not None and self.done is None and returncode in (PAUSED_EXIT_CODE, 0):
            step, key, sha256 = self.save_state_checkpoint(self.paused, "saved-at-step")
            if self.draining:
                raise RetryAttempt(f"Worker {self.worker} shut down; its state at step {step} is saved")
            if sha256 is not None:
                retrying(
                    lambda session: execution.pause_job(
                        session, self.job_id, self.attempt, step=step, resume_key=key, resume_sha256=sha256
                    ),
                    f"pausing {self.job_id}",
                )
            return
        if returncode != 0 or self.done is None:
            if self.error is not None:  # the recipe says why: the job's data or config, or its own failure
                raise RecipeFailed(self.error, returncode, list(self.stderr_tail))
            how = f"killed by signal {-returncode}" if returncode < 0 else f"exited with code {returncode}"
            last = next((line for line in reversed(self.stderr_tail) if line.strip()), "")
            raise RetryAttempt(f"Attempt {self.attempt}: the training process {how}" + (f" ({last})" if last else ""))
        self.promote_adapter()

    def promote_adapter(self) -> None:
        """Upload the adapter under this attempt's prefix, verify the stored bytes, then succeed the job in one
        fenced transaction. If another attempt owns the job by then, the upload is deleted: one adapter."""
        assert self.done is not None
        key = f"{self.prefix}/adapter.zip"
        sha256 = put_verified(self.storage, key, zip_folder(Path(self.done["adapter"])), self.settings.storage_retries)
        results_csv = metrics_csv(self.metrics_rows)
        final = self.done["metrics"]
        keys = (
            "train_loss",
            "train_mean_token_accuracy",
            "valid_loss",
            "valid_mean_token_accuracy",
            "full_valid_loss",
            "full_valid_mean_token_accuracy",
        )

        def succeed(session) -> bool:
            job = session.get(Job, self.job_id, populate_existing=True)
            assert job is not None
            if job.status == state.SUCCEEDED and job.adapter_key == key:
                return True  # an earlier try committed but its reply was lost
            if not execution.is_current(session, self.job_id, self.attempt):
                return False
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
                data=results_csv,
            )
            name = fine_tuned_model_name(job)
            return execution.succeed_job(
                session,
                self.job_id,
                self.attempt,
                fine_tuned_model=name,
                trained_tokens=self.done["trained_tokens"],
                adapter_key=key,
                adapter_sha256=sha256,
                result_files=[results.id],
                message=f"The job has successfully completed: {name}",
            )

        if not retrying(succeed, f"promoting the adapter of {self.job_id}"):
            log.warning("attempt %d of %s is stale; its adapter is discarded", self.attempt, self.job_id)
            self.discard(key)


class RecipeFailed(Exception):
    def __init__(self, error: dict | None, returncode: int, stderr_tail: list[str]):
        self.code = (error or {}).get("code") or ("worker_killed" if returncode < 0 else "training_error")
        message = (error or {}).get("message")
        if not message:
            last = next((line for line in reversed(stderr_tail) if line.strip()), "")
            message = f"the training process exited with code {returncode}" + (f": {last}" if last else "")
        self.param = (error or {}).get("param")
        super().__init__(message)


def die_with_this_worker() -> None:
    """In the child, before it runs: the kernel kills it if this worker dies (torchrun included, whose ranks
    in turn die with it)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def execution_event(runner: JobRunner, message: str) -> None:
    retrying(
        lambda session: execution.add_event(session, runner.job_id, runner.attempt, message),
        f"recording an event of {runner.job_id}",
    )


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
