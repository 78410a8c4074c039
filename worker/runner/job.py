"""Runs one claimed job: builds the recipe's config from the job row, runs the recipe in a child process, turns
its reports into fenced DB writes, promotes checkpoints and the adapter, and finishes the job. Whatever
happens, the job leaves `running` through this module."""

import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

from pydantic import ValidationError

from shared.db import retrying, session_scope
from shared.jobs import execution
from shared.jobs.service import ATTEMPT_LOG, attempt_prefix
from shared.settings import get_settings
from shared.storage import StorageError, get_storage
from worker.runner import warm
from worker.runner.child import RecipeChild, recipe_command
from worker.runner.config import training_config, write_training_config
from worker.runner.crash import cause, describe_crash
from worker.runner.errors import RecipeFailed, RetryAttempt
from worker.runner.inputs import ResumeCandidate, fetch_base_model, fetch_data, read_job_inputs
from worker.runner.journal import AttemptJournal
from worker.runner.lease import LeaseKeeper
from worker.runner.promotion import Promotion
from worker.runner.resume import fetch_resume_state
from worker.runner.startup import StartupTimeline
from worker.slots import Lease
from worker.training import dataset_cache
from worker.training.disk_space import is_disk_full
from worker.training.events import (
    RECIPE_EVENT,
    CheckpointEvent,
    DoneEvent,
    ErrorEvent,
    MessageEvent,
    MetricsEvent,
    PausedEvent,
    RecipeEvent,
)
from worker.training.process import DONE_EXIT_CODE, PAUSED_EXIT_CODE

log = logging.getLogger("tunequeue.worker")
# Set when the worker is asked to shut down (SIGTERM): running jobs checkpoint and go back to the queue.
SHUTDOWN = threading.Event()


class JobRunner:
    def __init__(self, job_id: str, attempt: int, worker: str, lease: "Lease | None" = None):
        self.job_id, self.attempt, self.worker = job_id, attempt, worker
        self.device_env = lease.environment() if lease is not None else {}
        self.devices = len(lease.ids) if lease is not None else 1
        self.slots = lease
        if lease is not None and lease.kind == "cpu" and self.devices > 1:
            self.device_env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed on CPU slots: gloo between the ranks
        self.settings = get_settings()
        self.storage = get_storage()
        self.done: DoneEvent | None = None
        self.paused: PausedEvent | None = None
        self.metrics_rows: list[dict] = []
        self.reporting = False
        self.errors: list[dict] = []  # under torchrun every failing rank reports; the first is the cause
        self.last_step = 0
        self._last_metrics_write = 0.0
        self._pending_metrics: dict | None = None
        self.cancelled = self.pausing = self.draining = False
        self.lease = LeaseKeeper(job_id, attempt, self.settings.lease_seconds)
        self.child: RecipeChild | None = None
        self.journal = AttemptJournal(job_id, attempt)
        self.startup = StartupTimeline(job_id, attempt)

    @property
    def prefix(self) -> str:
        """Every object this attempt writes lives under its own prefix; only a fenced DB write promotes one."""
        return attempt_prefix(self.tenant, self.job_id, self.attempt)

    @property
    def promotion(self) -> Promotion:
        return Promotion(self.job_id, self.attempt, self.tenant, self.storage, self.settings.storage_retries)

    def run(self) -> None:
        self.lease.start()
        try:
            with tempfile.TemporaryDirectory(prefix=f"tunequeue-{self.job_id}-") as scratch:
                workdir = Path(scratch)
                try:
                    config = self.prepare(workdir)
                except StorageError as exc:
                    # The tenant reads the reason in the job's events: the storage's own error (endpoint,
                    # bucket) is for the log.
                    log.warning("%s attempt %s: fetching its inputs failed: %s", self.job_id, self.attempt, exc)
                    raise RetryAttempt(
                        f"Attempt {self.attempt} could not fetch its inputs: storage unavailable", "storage_error"
                    ) from exc
                if SHUTDOWN.is_set():
                    raise RetryAttempt("Its worker is shutting down")
                self.startup.mark("inputs ready")
                returncode = self.run_recipe(config, workdir / "out")
                self.keep_dataset_cache_bounded()
                self.finish(returncode)
        except (OSError, StorageError, RetryAttempt) as exc:
            # This worker's own writes (downloads into scratch or the model cache, a checkpoint's metrics) found
            # its disk full: the node's fault, not the job's, whichever wrapper it reached us in.
            if not is_disk_full(exc) or getattr(exc, "code", None) == "disk_full":
                raise
            log.warning("%s attempt %s: worker %s: disk full: %s", self.job_id, self.attempt, self.worker, exc)
            raise RetryAttempt(f"Attempt {self.attempt}: no space left on its worker's disk", "disk_full") from exc
        finally:
            self.lease.stop()

    def prepare(self, workdir: Path) -> Path:
        """Fetches the attempt's inputs and writes the recipe's config; returns the config's path."""
        inputs = read_job_inputs(self.job_id)
        self.tenant = inputs.spec.tenant
        self.record_event("Preparing base model and training data")
        model_path = fetch_base_model(inputs, self.storage, self.settings)
        data = fetch_data(inputs, self.storage, workdir, self.settings.storage_retries)
        candidates = inputs.resume_candidates
        resume_from = self.fetch_resume_state(workdir, candidates) if candidates else None
        try:
            config = training_config(
                self.job_id, inputs, self.settings, model_path=model_path, data=data, resume_from=resume_from
            )
        except RecipeFailed as failed:
            self.record_failure(str(failed), None)
            raise
        return write_training_config(config, workdir / "config.json")

    def fetch_resume_state(self, workdir: Path, candidates: list[ResumeCandidate]) -> Path | None:
        """The newest checkpoint with full training state that verifies, and the metrics up to it; None: the
        attempt starts from the beginning."""
        tries = self.settings.storage_retries
        resumed = fetch_resume_state(self.storage, self.journal, workdir, candidates, tries)
        if resumed is None:
            return None
        self.metrics_rows, self.last_step = resumed.metrics_rows, resumed.step
        return resumed.folder

    def run_recipe(self, config: Path, out: Path) -> int:
        self.child = RecipeChild(self.job_id, out.parent, self.on_report)
        ready = warm.take(self.slots)
        if ready is not None:
            self.child.adopt(ready.process, config, out, self.device_env)
        else:
            python = self.settings.training_python or sys.executable
            self.child.start(recipe_command(python, config, out, self.devices), self.device_env)
        self.startup.warm = ready is not None
        self.startup.mark("process warm" if ready is not None else "process started")
        while self.child.poll() is None:
            time.sleep(self.settings.cancel_poll_seconds)
            self.follow_controls()
        returncode = self.child.join_readers()
        warm.replenish(self.slots)  # if its first step did not already (a CPU slot's, always here)
        self._flush_metrics(force=True)
        what = f"keeping the log of attempt {self.attempt}"
        self.child.log.keep(self.storage, f"{self.prefix}/{ATTEMPT_LOG}", what, self.settings.storage_retries)
        return returncode

    def keep_dataset_cache_bounded(self) -> None:
        folder = self.settings.resolved_dataset_cache_dir
        if folder is not None:
            dataset_cache.evict_oldest(folder, self.settings.dataset_cache_mb * 2**20)

    def follow_controls(self) -> None:
        """Cancel, pause or drain the recipe as the job's row and the worker ask."""
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

    def request_state_save(self) -> None:
        if not self.pausing:
            self.pausing = True
            assert self.child is not None
            self.child.request_pause()

    def stop_recipe(self) -> None:
        assert self.child is not None
        self.child.stop()

    def on_report(self, report: dict) -> None:
        """A report line of the recipe, read on the child's stdout thread: a failed DB write must not end the
        reading, the job still finishes."""
        self.reporting = True
        try:
            event = RECIPE_EVENT.validate_python(report)
        except ValidationError as exc:
            log.warning("ignored a report of %s of no known shape: %s", self.job_id, exc)
            return
        try:
            self.handle(event)
        except Exception as exc:
            log.exception("could not record event %s of %s", event.event, self.job_id)
            if is_disk_full(exc):  # a checkpoint this worker could not write: the node's fault, requeue
                step = getattr(event, "step", None)
                message = f"could not save the checkpoint at step {step}: no space left on the worker's disk"
                self.errors.insert(0, {"code": "disk_full", "message": message, "retryable": True})
                self.stop_recipe()

    def handle(self, event: RecipeEvent) -> None:
        match event:
            case MetricsEvent():
                if not self.startup.reported:
                    self.startup.first_step(event.step)
                    if self.slots is not None and self.slots.kind == "gpu":
                        # The slot's next ready process loads on the CPU while this job trains on the GPU. On a
                        # CPU slot it would take cores from the job: it loads once the job ends (`run_recipe`).
                        warm.replenish(self.slots)
                self.record_step(event)
            case CheckpointEvent():
                self.promotion.saved_state(event, self.metrics_rows, "step")
            case MessageEvent():
                self.startup.recipe_said(event.message)
                self.record_event(event.message, event.level)
            case DoneEvent():
                self.done = event
            case PausedEvent():
                self.paused = event
            case ErrorEvent():
                self.errors.append(event.report())

    def record_step(self, event: MetricsEvent) -> None:
        row = event.row()
        self.last_step = event.step
        self.metrics_rows.append(row)
        self._pending_metrics = row
        self._flush_metrics(force=event.step in (1, event.total_steps))

    def _flush_metrics(self, force: bool) -> None:
        pending = self._pending_metrics
        interval = self.settings.metrics_interval_seconds
        if pending is None or (not force and time.monotonic() - self._last_metrics_write < interval):
            return
        self._pending_metrics = None
        self._last_metrics_write = time.monotonic()
        with session_scope() as session:
            execution.record_metrics(session, self.job_id, self.attempt, pending)

    def finish(self, returncode: int) -> None:
        if self.cancelled:
            # Cancelled by the user, or this attempt is stale (reaped): the fenced write settles which.
            retrying(
                lambda session: execution.cancel_running_job(session, self.job_id, self.attempt),
                f"cancelling {self.job_id}",
            )
            return
        # One process exits PAUSED_EXIT_CODE after a pause; ranks under torchrun exit 0 (torchrun fails a run
        # on any other code): the "paused" event without a "done" is what tells.
        if self.paused is not None and self.done is None and returncode in (PAUSED_EXIT_CODE, DONE_EXIT_CODE):
            self.save_paused_state(self.paused)
            return
        if returncode != DONE_EXIT_CODE or self.done is None:
            raise self.failure(returncode)
        self.promotion.adapter(self.done, self.metrics_rows)

    def save_paused_state(self, paused: PausedEvent) -> None:
        step, key, sha256 = self.promotion.saved_state(paused, self.metrics_rows, "saved-at-step")
        if self.draining:
            raise RetryAttempt(f"Its worker shut down; its state at step {step} is saved")
        if sha256 is not None:
            retrying(
                lambda session: execution.pause_job(
                    session, self.job_id, self.attempt, step=step, resume_key=key, resume_sha256=sha256
                ),
                f"pausing {self.job_id}",
            )

    def failure(self, returncode: int) -> Exception:
        """Why the recipe failed, as the exception that settles the job. An error the recipe reported fails the
        job (its data, config or code), unless it says the node was at fault (a full disk). A crash it could not
        report (a signal, a rank lost) is retried as the node's fault, but not twice in a row at the same step
        with the same error: that is the job's own, and another attempt would only repeat it."""
        stderr_tail = list(self.child.stderr_tail) if self.child is not None else []
        error = cause(self.errors)
        if error is not None and error.get("retryable"):
            return RetryAttempt(f"Attempt {self.attempt}: {error['message']}", error.get("code") or "worker_lost")
        if error is not None:
            failed = RecipeFailed(error, returncode, stderr_tail)
            self.record_failure(str(failed), error.get("traceback"))
            return failed
        crash = describe_crash(returncode, stderr_tail)
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
        self.journal.failure(self.last_step, error, frames)

    def record_event(self, message: str, level: str = "info") -> None:
        self.journal.event(message, level)
