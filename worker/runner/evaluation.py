"""Makes an evaluation asked for on demand (`shared.jobs.evaluations`) for a claimed job, on one of this worker's
slots: fetches the base, the job's data and its delivered adapter (each verified against its recorded sha256),
builds the job's TrainingConfig as its training did, runs `python -m worker.training.evaluate_job` in a child
process (forked from the worker's fork server when it has one), and stores the result with the job, its JSON
among the job's result files. The claim is renewed while it runs; whatever happens, the evaluation leaves
`running` here (or its lease passes, if this worker dies)."""

import json
import logging
import subprocess
import tempfile
import zipfile
from functools import partial
from pathlib import Path

from shared.db import retrying, session_scope
from shared.files.service import create_result_file
from shared.jobs import evaluations
from shared.jobs.models import Job
from shared.jobs.schemas import JobEvaluation
from shared.settings import get_settings
from shared.storage import download_verified, get_storage
from worker.runner.child import recipe_environment
from worker.runner.config import training_config, write_training_config
from worker.runner.errors import TaskFailed, failure_reason
from worker.runner.inputs import fetch_base_model, fetch_data, read_job_inputs
from worker.runner.lease import ClaimRenewal
from worker.runner.warm import start_module
from worker.slots import Lease

log = logging.getLogger("tunequeue.worker")
TIMEOUT_SECONDS = 3600  # at most 200 validation examples twice, and a few short answers: well within this
STDERR_TAIL_LINES = 20


def run_evaluation(job_id: str, lease: Lease) -> None:
    """The evaluation of a job whose evaluation this worker has claimed, stored or failed."""
    lease_seconds = get_settings().lease_seconds
    renewal = partial(evaluations.renew_evaluation, job_id=job_id, lease_seconds=lease_seconds)
    try:
        with ClaimRenewal(f"evaluation of {job_id}", renewal, lease_seconds):
            evaluation, summary = EvaluationRun(job_id, lease).make()
        store(job_id, evaluation, summary)
    except Exception as exc:
        log.exception("evaluation of %s failed", job_id)
        reason = failure_reason(exc)
        retrying(lambda session: evaluations.fail_evaluation(session, job_id, reason), f"failing evaluation {job_id}")


class EvaluationRun:
    def __init__(self, job_id: str, lease: Lease):
        self.job_id, self.lease = job_id, lease
        self.settings = get_settings()
        self.storage = get_storage()

    def make(self) -> tuple[dict, str]:
        """The evaluation, and its one line for the job's events."""
        with tempfile.TemporaryDirectory(prefix=f"tunequeue-evaluation-{self.job_id}-") as scratch:
            workdir = Path(scratch)
            inputs = read_job_inputs(self.job_id)
            model_path = fetch_base_model(inputs, self.storage, self.settings)
            data = fetch_data(inputs, self.storage, workdir, self.settings.storage_retries)
            adapter = self.fetch_adapter(workdir)
            config = training_config(self.job_id, inputs, self.settings, model_path=model_path, data=data,
                                     resume_from=None)  # fmt: skip
            config_file = write_training_config(config, workdir / "config.json")
            out = workdir / "out"
            summary = self.run_child(config_file, adapter, out)
            return json.loads((out / "evaluation.json").read_text()), summary

    def fetch_adapter(self, workdir: Path) -> Path:
        with session_scope() as session:
            job = session.get(Job, self.job_id)
            assert job is not None
            key, sha256 = job.adapter_key, job.adapter_sha256
        if not key or not sha256:
            raise TaskFailed("the job has no adapter to evaluate")
        archive, folder = workdir / "adapter.zip", workdir / "adapter"
        download_verified(self.storage, key, archive, sha256, self.settings.storage_retries)
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(folder)
        return folder

    def run_child(self, config: Path, adapter: Path, out: Path) -> str:
        """Runs the evaluation's process; returns its one-line summary."""
        args = ["--config", str(config), "--adapter", str(adapter), "--out", str(out)]
        env = recipe_environment(self.lease.environment(), None)
        process = start_module("worker.training.evaluate_job", args, env, self.settings.training_python)
        try:
            stdout, stderr = process.communicate(timeout=TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise TaskFailed(f"it ran past {TIMEOUT_SECONDS} s") from None
        if process.returncode != 0:
            tail = [line for line in stderr.splitlines() if line.strip()][-STDERR_TAIL_LINES:]
            log.error("evaluation of %s: its process failed:\n%s", self.job_id, "\n".join(tail))
            last = tail[-1].strip() if tail else f"exit code {process.returncode}"
            raise TaskFailed(f"its process failed: {last[:500]}")
        return json.loads(stdout.strip().splitlines()[-1])["summary"]


def store(job_id: str, evaluation: dict, summary: str) -> None:
    """The evaluation with the job, and its JSON (as the API shows it) among the job's result files. Its object
    is deleted again if the evaluation is no longer wanted (the model was deleted meanwhile)."""
    storage = get_storage()
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        shown = None
        if evaluation.get("base") is not None and evaluation.get("tuned") is not None:
            shown = JobEvaluation.build(job.id, job.model, job.fine_tuned_model, evaluation)
        result = None
        if shown is not None:
            data = shown.model_dump_json(indent=2).encode()
            filename = f"{job_id}_evaluation.json"
            result = create_result_file(session, storage, tenant=job.tenant, job_id=job_id, filename=filename,
                                        data=data)  # fmt: skip
        stored = evaluations.store_evaluation(session, job_id, evaluation, result.id if result else None, summary)
        if not stored and result is not None:
            storage.delete(result.storage_key)
            session.rollback()
