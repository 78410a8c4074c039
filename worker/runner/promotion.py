"""Fenced promotion of what an attempt produced. Every object is written under the attempt's own prefix and read
back before a DB write (fenced by `attempt`, through shared.jobs.execution) makes it the job's: a stale
attempt's uploads are deleted again and never become a checkpoint or the adapter."""

import csv
import io
import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from shared.db import retrying
from shared.files.service import create_result_file
from shared.jobs import execution, state
from shared.jobs.models import Job
from shared.jobs.schemas import JobEvaluation
from shared.jobs.service import attempt_prefix, fine_tuned_model_name
from shared.storage import Storage, put_verified
from worker.training.events import DoneEvent, SavedStateEvent

log = logging.getLogger("tunequeue.worker")
# The final metrics the delivered adapter's checkpoint records.
ADAPTER_METRICS = (
    "train_loss",
    "train_mean_token_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "full_valid_loss",
    "full_valid_mean_token_accuracy",
)


@dataclass(frozen=True)
class StoredObject:
    """An object written and read back: what its DB row records (the size counts in the tenant's quota)."""

    key: str
    sha256: str
    size: int


class Promotion:
    def __init__(self, job_id: str, attempt: int, tenant: str, storage: Storage, tries: int):
        self.job_id, self.attempt, self.tenant = job_id, attempt, tenant
        self.storage, self.tries = storage, tries

    @property
    def prefix(self) -> str:
        return attempt_prefix(self.tenant, self.job_id, self.attempt)

    def saved_state(self, saved: SavedStateEvent, metrics_rows: list[dict], name: str) -> tuple[int, str, str | None]:
        """Upload the recipe's saved state (with the metrics so far) and record it as a resumable checkpoint.
        A pause or a shutdown saves under its own name: it may land on the step of a periodic checkpoint,
        and an object, once recorded with its sha256, is never overwritten. Returns (step, key, sha256), the
        sha256 None when this attempt is stale."""
        folder = Path(saved.path)
        (folder / "metrics_rows.json").write_text(json.dumps(metrics_rows))
        key = f"{self.prefix}/checkpoints/{name}-{saved.step}.zip"
        return saved.step, key, self.checkpoint(saved.step, saved.metrics, zip_folder(folder), key)

    def checkpoint(self, step: int, metrics: dict, data: bytes, key: str) -> str | None:
        """Write the object, read it back, write its completion marker, then record it in the DB (fenced)."""
        sha256 = put_verified(self.storage, key, data, self.tries)
        marker = json.dumps({"key": key, "sha256": sha256, "bytes": len(data), "step": step}).encode()
        put_verified(self.storage, f"{key}.complete", marker, self.tries)
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
                    size=len(data),
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

    def adapter(self, done: DoneEvent, metrics_rows: list[dict]) -> None:
        """Upload the adapter, verify the stored bytes, then succeed the job in one fenced transaction. If
        another attempt owns the job by then, the upload is deleted: one adapter."""
        key, data = f"{self.prefix}/adapter.zip", zip_folder(Path(done.adapter))
        sha256 = put_verified(self.storage, key, data, self.tries)
        stored = StoredObject(key, sha256, len(data))
        results = JobResults(metrics_csv(metrics_rows), read_evaluation(done, self.job_id))
        if not retrying(
            lambda session: self._succeed(session, done, stored, results),
            f"promoting the adapter of {self.job_id}",
        ):
            log.warning("attempt %d of %s is stale; its adapter is discarded", self.attempt, self.job_id)
            self.discard(key)

    def _succeed(self, session: Session, done: DoneEvent, adapter: StoredObject, results: "JobResults") -> bool:
        job = session.get(Job, self.job_id, populate_existing=True)
        assert job is not None
        if job.status == state.SUCCEEDED and job.adapter_key == adapter.key:
            return True  # an earlier try committed but its reply was lost
        if not execution.is_current(session, self.job_id, self.attempt):
            return False
        final = done.metrics
        # The delivered adapter is the newest checkpoint, with the final (full validation) metrics.
        execution.record_checkpoint(
            session,
            self.job_id,
            self.attempt,
            step=final["step"],
            metrics={k: final[k] for k in ADAPTER_METRICS if final.get(k) is not None},
            storage_key=adapter.key,
            sha256=adapter.sha256,
            size=adapter.size,
        )
        name = fine_tuned_model_name(job)
        return execution.succeed_job(
            session,
            self.job_id,
            self.attempt,
            fine_tuned_model=name,
            trained_tokens=done.trained_tokens,
            adapter_key=adapter.key,
            adapter_sha256=adapter.sha256,
            adapter_bytes=adapter.size,
            result_files=self._result_files(session, results, job.model, name),
            evaluation=results.evaluation,
            message=f"The job has successfully completed: {name}",
        )

    def _result_files(self, session: Session, results: "JobResults", model: str, fine_tuned_model: str) -> list[str]:
        """The step metrics as CSV (OpenAI's result file, first), and the evaluation as JSON when there is one."""
        files = [(f"{self.job_id}_results.csv", results.metrics_csv)]
        shown = results.evaluation_json(self.job_id, model, fine_tuned_model)
        if shown is not None:
            files.append((f"{self.job_id}_evaluation.json", shown))
        return [
            create_result_file(
                session, self.storage, tenant=self.tenant, job_id=self.job_id, filename=filename, data=data
            ).id
            for filename, data in files
        ]

    def discard(self, *keys: str) -> None:
        for key in keys:
            try:
                self.storage.delete(key)
            except Exception:
                log.exception("could not delete %s", key)


@dataclass(frozen=True)
class JobResults:
    """What a succeeded job keeps besides its adapter: its step metrics, and its evaluation as the recipe wrote
    it (None: the recipe wrote none)."""

    metrics_csv: bytes
    evaluation: dict | None

    def evaluation_json(self, job_id: str, model: str, fine_tuned_model: str) -> bytes | None:
        """The evaluation as `GET /v1/fine_tuning/jobs/{id}/evaluation` shows it; None when it has nothing to
        show (no validation examples)."""
        evaluation = self.evaluation
        if evaluation is None or evaluation.get("base") is None or evaluation.get("tuned") is None:
            return None
        return JobEvaluation.build(job_id, model, fine_tuned_model, evaluation).model_dump_json(indent=2).encode()


def read_evaluation(done: DoneEvent, job_id: str) -> dict | None:
    """The recipe's evaluation.json. One that cannot be read or shown is logged and left out: the adapter is
    trained and the job succeeds without it."""
    if done.evaluation is None:
        return None
    try:
        evaluation = json.loads(Path(done.evaluation).read_text())
        if evaluation.get("base") is not None and evaluation.get("tuned") is not None:
            JobEvaluation.build(job_id, "", None, evaluation)  # shown as the API shows it, or not at all
        return evaluation
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("the evaluation of %s is left out: %s", job_id, exc)
        return None


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
