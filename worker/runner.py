"""Runs one claimed job: builds the recipe's config from the job row, runs the recipe in a child process in
its own process group, turns its reports into fenced DB writes, uploads checkpoints and the adapter, and
finishes the job. Whatever happens, the job leaves `running` through this module."""

import csv
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from shared.basemodels.service import ensure_local_copy, get_base_model
from shared.db import retrying, session_scope
from shared.files.models import File
from shared.files.service import create_result_file
from shared.jobs import execution, state
from shared.jobs.models import Job
from shared.jobs.service import ATTEMPT_LOG, attempt_prefix, fine_tuned_model_name
from shared.settings import get_settings
from shared.storage import (
    ChecksumMismatch,
    ObjectNotFound,
    StorageError,
    download_verified,
    get_storage,
    put_verified,
    with_retries,
)
from worker.slots import Lease
from worker.training.control import PAUSE_FILE_ENV
from worker.training.disk_space import is_disk_full
from worker.training.reporter import parse_line

PAUSED_EXIT_CODE = 3  # worker.training.recipe.PAUSED_EXIT_CODE; importing it would import torch here

log = logging.getLogger("tunequeue.worker")
STOP_GRACE_SECONDS = 5
STDERR_TAIL_LINES = 200  # torchrun's failure report alone is ~30 lines; the failing rank's lines come before it
LOG_MAX_BYTES = 8 * 2**20
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
        self.done: dict | None = None
        self.metrics_rows: list[dict] = []
        self.paused: dict | None = None
        self.reporting = False
        self.errors: list[dict] = []  # under torchrun every failing rank reports; the first is the cause
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.last_step = 0
        self.log_lock = threading.Lock()
        self.log_file: io.TextIOBase | None = None
        self._last_metrics_write = 0.0
        self._pending_metrics: dict | None = None
        self.cancelled = self.pausing = self.draining = False
        self.lease = LeaseKeeper(job_id, attempt, self.settings.lease_seconds)

    @property
    def prefix(self) -> str:
        """Every object this attempt writes lives under its own prefix; only a fenced DB write promotes one."""
        return attempt_prefix(self.tenant, self.job_id, self.attempt)

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
        except (OSError, StorageError, RetryAttempt) as exc:
            # This worker's own writes (downloads into scratch or the model cache, a checkpoint's metrics) found
            # its disk full: the node's fault, not the job's, whichever wrapper it reached us in.
            if not is_disk_full(exc) or getattr(exc, "code", None) == "disk_full":
                raise
            message = str(exc) if isinstance(exc, RetryAttempt) else f"Attempt {self.attempt}: {exc}"
            raise RetryAttempt(f"{message} (the disk of worker {self.worker} is full)", "disk_full") from exc
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
            candidates = [
                ResumeCandidate(c.id, c.storage_key, c.sha256, c.step)
                for c in execution.resumable_checkpoints(session, self.job_id)
            ]
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
        resume_from = self.fetch_resume_state(workdir, candidates) if candidates else None
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

    def fetch_resume_state(self, workdir: Path, candidates: list["ResumeCandidate"]) -> Path | None:
        """The newest checkpoint with full training state whose stored bytes are the ones recorded in the DB.
        One that fails verification (or is gone) is marked unusable and the next older one is tried; with
        none left the attempt starts from the beginning. Storage that cannot be reached is not a verdict on a
        checkpoint: that raises, and the attempt is requeued."""
        archive, tried, tries = workdir / "resume.zip", [], self.settings.storage_retries
        for checkpoint in candidates:
            try:
                download_verified(self.storage, checkpoint.key, archive, checkpoint.sha256, tries)
            except (ChecksumMismatch, ObjectNotFound) as exc:
                tried.append(f"step {checkpoint.step}")
                reason = "is missing" if isinstance(exc, ObjectNotFound) else "failed verification"
                retrying(
                    lambda session, c=checkpoint: execution.mark_checkpoint_unusable(
                        session, self.job_id, self.attempt, c.id
                    ),
                    f"marking checkpoint {checkpoint.id} unusable",
                )
                execution_event(
                    self, f"The checkpoint at step {checkpoint.step} {reason} ({exc}); it is marked unusable",
                    level="warning",
                )  # fmt: skip
                continue
            folder = workdir / "resume"
            zipfile.ZipFile(archive).extractall(folder)
            rows = json.loads((folder / "metrics_rows.json").read_text())
            self.metrics_rows = [row for row in rows if row["step"] <= checkpoint.step]
            self.last_step = checkpoint.step
            execution_event(self, f"Resuming from the checkpoint at step {checkpoint.step} (sha256 verified)")
            return folder
        execution_event(
            self, f"No checkpoint verified (tried {', '.join(tried)}): training starts from the beginning",
            level="warning",
        )  # fmt: skip
        return None

    def run_recipe(self, config: Path, out: Path) -> int:
        python = self.settings.training_python or sys.executable
        recipe = ["-m", "worker.training", "--config", str(config), "--out", str(out)]
        self.pause_file = out.parent / "pause-requested"
        if self.devices > 1:  # one process per device, trained together by DeepSpeed
            port = free_port()
            command = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(self.devices)]
            command += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
            # Every rank's stderr reaches the attempt's log with its rank in front ("[default1]:…").
            command += ["--tee", "2", "--log-dir", str(out.parent / "ranks"), *recipe]
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
                # A GPU lease trains over NCCL, whatever DeepSpeed accelerator the worker itself was started with.
                **{k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR" or self.device_env.get(k)},
                "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "TUNEQUEUE_PARENT_PID": str(os.getpid()),  # the recipe dies with this worker (PDEATHSIG)
                PAUSE_FILE_ENV: str(self.pause_file),
                **self.device_env,  # its own devices only
            },
        )
        self.log_file = open(out.parent / "attempt.log", "w", encoding="utf-8", errors="replace")  # noqa: SIM115
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
        self.keep_log()
        return self.process.returncode

    def _log_line(self, line: str) -> None:
        with self.log_lock:
            if self.log_file is not None and not self.log_file.closed:
                self.log_file.write(line + "\n")

    def keep_log(self) -> None:
        """The attempt's output (the recipe's and every rank's stderr) as an object of the attempt, readable at
        GET /v1/fine_tuning/jobs/{id}/attempts/{n}/log. A very long one keeps its beginning and its end."""
        with self.log_lock:
            assert self.log_file is not None
            path = Path(self.log_file.name)
            self.log_file.close()
        data = path.read_bytes()
        if len(data) > LOG_MAX_BYTES:
            head, tail = data[: LOG_MAX_BYTES // 8], data[-(LOG_MAX_BYTES - LOG_MAX_BYTES // 8) :]
            data = head + f"\n[… {len(data) - len(head) - len(tail)} bytes left out …]\n".encode() + tail
        try:
            with_retries(
                lambda: self.storage.put_bytes(f"{self.prefix}/{ATTEMPT_LOG}", data),
                f"keeping the log of attempt {self.attempt}",
                self.settings.storage_retries,
            )
        except StorageError as exc:  # the job's outcome does not depend on its log
            log.warning("%s", exc)

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
                self._log_line(line.rstrip("\n"))
                continue
            try:
                self.handle(event)
            except Exception as exc:  # a failed DB write must not kill the reader; the job still finishes
                log.exception("could not record event %s of %s", event.get("event"), self.job_id)
                if is_disk_full(exc):  # a checkpoint this worker could not write: the node's fault, requeue
                    message = f"could not save the checkpoint at step {event.get('step')}: {exc}"
                    self.errors.insert(0, {"code": "disk_full", "message": message, "retryable": True})
                    self.stop_recipe()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr_tail.append(line.rstrip())
            self._log_line(line.rstrip("\n"))

    def handle(self, event: dict) -> None:
        self.reporting = True
        kind = event.pop("event")
        if kind == "metrics":
            self.last_step = event["step"]
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
            self.errors.append(event)

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
            raise self.failure(returncode)
        self.promote_adapter()

    def failure(self, returncode: int) -> Exception:
        """Why the recipe failed, as the exception that settles the job. An error the recipe reported fails the
        job (its data, config or code), unless it says the node was at fault (a full disk). A crash it could not
        report (a signal, a rank lost) is retried as the node's fault, but not twice in a row at the same step
        with the same error: that is the job's own, and another attempt would only repeat it."""
        error = cause(self.errors)
        if error is not None and error.get("retryable"):
            return RetryAttempt(f"Attempt {self.attempt}: {error['message']}", error.get("code") or "worker_lost")
        if error is not None:
            failed = RecipeFailed(error, returncode, list(self.stderr_tail))
            self.record_failure(str(failed), error.get("traceback"))
            return failed
        crash = describe_crash(returncode, list(self.stderr_tail))
        previous = retrying(
            lambda session: execution.attempt_failure(session, self.job_id, self.attempt - 1),
            f"reading the previous failure of {self.job_id}",
        )
        self.record_failure(crash, None)
        if previous is not None and previous == {"step": self.last_step, "error": crash}:
            message = (
                f"the training process {crash}, at step {self.last_step} as in attempt {self.attempt - 1}: "
                "the same failure twice is the job's, not the node's, and is not retried"
            )
            return RecipeFailed({"code": "training_error", "message": message}, returncode, [])
        return RetryAttempt(f"Attempt {self.attempt}: the training process {crash}")

    def record_failure(self, error: str, frames: str | None) -> None:
        """An event for the failed attempt: what failed, where, and the traceback's last frames; its data lets
        the next attempt tell a repeated failure. The whole output is the attempt's log."""
        message = f"Attempt {self.attempt} failed at step {self.last_step}: {error}"
        if frames:
            message += "\n" + frames.rstrip()
        data = {
            "failure": {"step": self.last_step, "error": error},
            "log": f"/v1/fine_tuning/jobs/{self.job_id}/attempts/{self.attempt}/log",
        }
        retrying(
            lambda session: execution.add_event(session, self.job_id, self.attempt, message, level="error", data=data),
            f"recording the failure of {self.job_id}",
        )

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
            message = f"the training process {describe_crash(returncode, stderr_tail)}"
        elif (error or {}).get("rank") is not None:
            message = f"{message} (rank {error['rank']})"  # type: ignore[index]
        self.param = (error or {}).get("param")
        super().__init__(message)


@dataclass
class ResumeCandidate:
    id: str
    key: str
    sha256: str
    step: int


# A rank that fails first reports its exception; the others then fail in a collective it left. The cause is
# the first report that is not such an echo.
COLLECTIVE_ECHOES = ("DistBackendError", "Connection closed by peer", "Connection reset by peer", "NCCL", "Gloo")


def cause(errors: list[dict]) -> dict | None:
    own = [e for e in errors if not any(echo in e.get("message", "") for echo in COLLECTIVE_ECHOES)]
    return (own or errors or [None])[0]


ROOT_CAUSE_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")
ROOT_CAUSE_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")
RANK_PREFIX = re.compile(r"^\[default(\d+)\]:")
NOISE = re.compile(r"^[\s=*\-]*$|^[EWI]\d{4} |^Traceback \(most recent call last\):$|Warning\b|warnings\.warn\(")
FATAL = re.compile(r"\b\w*(Error|Exception|Fault|Abort\w*)\b|terminate called|core dumped", re.IGNORECASE)


def describe_crash(returncode: int, stderr_lines: list[str]) -> str:
    """How the recipe ended without reporting why: which rank (torchrun's "Root Cause" block names it), by
    which signal or exit code, and that rank's last meaningful line of stderr (after a signal, only one that
    reads as an error), never a banner or a warning."""
    rank, code = None, returncode
    for line in stderr_lines:
        if match := ROOT_CAUSE_RANK.match(line):
            rank = int(match.group(1))
        elif (match := ROOT_CAUSE_EXIT.match(line)) and rank is not None:
            code = int(match.group(1))
    how = f"was killed by signal {signal_name(-code)}" if code < 0 else f"exited with code {code}"
    last = ""
    for line in reversed(stderr_lines):
        prefix = RANK_PREFIX.match(line)
        if rank is not None and (prefix is None or int(prefix.group(1)) != rank):
            continue
        text = line[prefix.end() :] if prefix else line
        if not NOISE.search(text):
            last = text.strip() if code > 0 or FATAL.search(text) else ""
            break
    head = f"(rank {rank}) {how}" if rank is not None else how
    return head + (f": {last}" if last else "")


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


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


def execution_event(runner: JobRunner, message: str, level: str = "info") -> None:
    retrying(
        lambda session: execution.add_event(session, runner.job_id, runner.attempt, message, level=level),
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
