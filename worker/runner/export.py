"""Makes a claimed export (`shared.exports.service`) on one of this worker's slots: fetches the base, the job's
data and its adapter (each verified against its recorded sha256), builds the job's TrainingConfig as its
training did, runs `python -m worker.training.export` in a child process (forked from the worker's fork server
when it has one; its progress lines become the export's `progress`), and stores the folder as one zip only when
the export's fidelity is within bounds: a failed export leaves no object. Whatever happens, the export leaves
`running` here (or its lease passes, if this worker dies)."""

import json
import logging
import subprocess
import tempfile
import threading
import zipfile
from collections import deque
from pathlib import Path

from shared.db import retrying, session_scope
from shared.exports import service
from shared.exports.models import Export
from shared.jobs.models import Job
from shared.settings import get_settings
from shared.storage import download_verified, get_storage, put_verified
from worker.runner.child import recipe_environment
from worker.runner.config import training_config, write_training_config
from worker.runner.errors import TaskFailed, failure_reason
from worker.runner.inputs import fetch_base_model, fetch_data, read_job_inputs
from worker.runner.lease import ClaimRenewal
from worker.runner.warm import start_module
from worker.slots import Lease

log = logging.getLogger("tunequeue.worker")
TIMEOUT_SECONDS = 6 * 3600
STDERR_TAIL_LINES = 20


def run_export(export_id: str, lease: Lease) -> None:
    """The export this worker has claimed, stored or failed."""
    lease_seconds = get_settings().lease_seconds
    run = ExportRun(export_id, lease)

    def renew(session) -> None:
        service.renew_export(session, export_id, lease_seconds, run.progress)

    try:
        with ClaimRenewal(f"export {export_id}", renew, lease_seconds):
            run.make()
    except Exception as exc:
        log.exception("export %s failed", export_id)
        manifest = exc.manifest if isinstance(exc, TaskFailed) else None
        reason = failure_reason(exc)
        retrying(lambda session: service.fail_export(session, export_id, reason, manifest), f"failing {export_id}")


class ExportRun:
    def __init__(self, export_id: str, lease: Lease):
        self.export_id, self.lease = export_id, lease
        self.settings = get_settings()
        self.storage = get_storage()
        self.progress: str | None = None

    def make(self) -> None:
        with session_scope() as session:
            export = session.get(Export, self.export_id)
            assert export is not None
            job_id, tenant = export.job_id, export.tenant
            options = {"format": export.format, **export.options}
            job = session.get(Job, job_id)
            assert job is not None
            adapter_key, adapter_sha256 = job.adapter_key, job.adapter_sha256
        if not adapter_key or not adapter_sha256:
            raise TaskFailed("the job has no adapter to export")
        with tempfile.TemporaryDirectory(prefix=f"tunequeue-{self.export_id}-") as scratch:
            workdir = Path(scratch)
            self.progress = "fetching the base model, data and adapter"
            inputs = read_job_inputs(job_id)
            model_path = fetch_base_model(inputs, self.storage, self.settings)
            data = fetch_data(inputs, self.storage, workdir, self.settings.storage_retries)
            adapter = workdir / "adapter"
            download_verified(self.storage, adapter_key, workdir / "adapter.zip", adapter_sha256,
                              self.settings.storage_retries)  # fmt: skip
            with zipfile.ZipFile(workdir / "adapter.zip") as zipped:
                zipped.extractall(adapter)
            config = training_config(job_id, inputs, self.settings, model_path=model_path, data=data,
                                     resume_from=None)  # fmt: skip
            config_file = write_training_config(config, workdir / "config.json")
            result = self.run_child(config_file, adapter, workdir / "out", options)
            manifest = json.loads(Path(result["manifest"]).read_text())
            if not result["passed"]:
                raise TaskFailed(f"its fidelity is outside the bounds: {result['summary']}", manifest)
            self.progress = "uploading"
            archive = zip_folder(workdir / "out" / "model", workdir / "export.zip")
            self.store(tenant, job_id, archive, manifest, result["summary"])

    def run_child(self, config: Path, adapter: Path, out: Path, options: dict) -> dict:
        args = ["--config", str(config), "--adapter", str(adapter),
                "--out", str(out), "--format", options["format"], "--base-weights", options["base_weights"],
                *(("--dtype", options["dtype"]) if "dtype" in options else ()),
                *(("--quantization", options["quantization"]) if "quantization" in options else ()),
                "--max-loss-drift", str(options.get("max_loss_drift", self.settings.export_max_loss_drift)),
                "--shard-mb", str(self.settings.export_shard_mb)]  # fmt: skip
        env = recipe_environment(self.lease.environment(), None)
        process = start_module("worker.training.export", args, env, self.settings.training_python)
        tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)

        def follow() -> None:
            for line in process.stderr or ():
                tail.append(line)
                if line.startswith(("merging:", "writing GGUF:", "measuring")):
                    self.progress = line.strip()

        reader = threading.Thread(target=follow, name=f"{self.export_id}-stderr", daemon=True)
        reader.start()
        try:
            stdout = process.stdout.read() if process.stdout else ""
            process.wait(timeout=TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise TaskFailed(f"it ran past {TIMEOUT_SECONDS} s") from None
        reader.join(timeout=5)
        if process.returncode != 0:
            lines = [line.strip() for line in tail if line.strip()]
            log.error("export %s: its process failed:\n%s", self.export_id, "\n".join(lines))
            raise TaskFailed(f"its process failed: {(lines[-1] if lines else process.returncode)!s:.500}")
        return json.loads(stdout.strip().splitlines()[-1])

    def store(self, tenant: str, job_id: str, archive: Path, manifest: dict, summary: str) -> None:
        key = f"tenants/{tenant}/jobs/{job_id}/exports/{self.export_id}.zip"
        with archive.open("rb") as stream:
            sha256 = put_verified(self.storage, key, stream, self.settings.storage_retries)
        size = archive.stat().st_size
        try:
            with session_scope() as session:
                stored = service.finish_export(session, self.export_id, key, sha256, size, manifest, summary)
        except BaseException:
            self.storage.delete(key)
            raise
        if not stored:  # the model was deleted meanwhile, or another worker took the export over
            self.storage.delete(key)


def zip_folder(folder: Path, archive: Path) -> Path:
    """The folder's files at the zip's root; weights stored as they are (they do not compress), the rest
    deflated."""
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(folder.iterdir()):
            packed = zipfile.ZIP_STORED if path.suffix == ".safetensors" else zipfile.ZIP_DEFLATED
            zipped.write(path, path.name, compress_type=packed)
    return archive
