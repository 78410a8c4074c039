"""What an attempt trains from: the job row's settings, the base model and the data files (fetched and
verified against their recorded sha256), and the checkpoints it may resume from."""

from dataclasses import dataclass
from pathlib import Path

from shared.basemodels.models import BaseModelRecord
from shared.basemodels.service import ensure_local_copy, get_base_model
from shared.db import session_scope
from shared.files.models import File
from shared.jobs import execution
from shared.jobs.models import Job
from shared.settings import Settings
from shared.storage import Storage, download_verified, with_retries


@dataclass
class ResumeCandidate:
    id: str
    key: str
    sha256: str
    step: int


@dataclass
class JobSpec:
    """What the job row says about its training."""

    tenant: str
    model_id: str
    options: dict
    hyperparameters: dict
    seed: int


@dataclass
class JobInputs:
    spec: JobSpec
    base: BaseModelRecord
    sources: dict[str, tuple[str, str]]  # "train" (and "validation"): (storage key, sha256)
    resume_candidates: list[ResumeCandidate]  # newest first

    @property
    def dataset_sha256(self) -> str:
        return self.sources["train"][1]


def read_job_inputs(job_id: str) -> JobInputs:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        base = get_base_model(session, job.model)
        files = {"train": session.get(File, job.training_file)}
        if job.validation_file:
            files["validation"] = session.get(File, job.validation_file)
        candidates = [
            ResumeCandidate(c.id, c.storage_key, c.sha256, c.step)
            for c in execution.resumable_checkpoints(session, job_id)
        ]
        spec = JobSpec(job.tenant, job.model, job.training_options, job.hyperparameters, job.seed)
        sources = {name: (f.storage_key, f.sha256) for name, f in files.items() if f is not None}
    return JobInputs(spec, base, sources, candidates)


def fetch_base_model(inputs: JobInputs, storage: Storage, settings: Settings) -> Path:
    return with_retries(
        lambda: ensure_local_copy(inputs.base, storage, settings.resolved_model_dir),
        "fetching the base",
        settings.storage_retries,
    )


def fetch_data(inputs: JobInputs, storage: Storage, workdir: Path, tries: int) -> dict[str, Path]:
    paths = {}
    for name, (key, sha256) in inputs.sources.items():
        paths[name] = workdir / f"{name}.jsonl"
        download_verified(storage, key, paths[name], sha256, tries)
    return paths
