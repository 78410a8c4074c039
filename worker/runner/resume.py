"""The state an attempt resumes from: the newest checkpoint whose stored bytes are the ones recorded."""

import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

from shared.db import retrying
from shared.jobs import execution
from shared.storage import ChecksumMismatch, ObjectNotFound, Storage, download_verified
from worker.runner.inputs import ResumeCandidate
from worker.runner.journal import AttemptJournal

log = logging.getLogger("tunequeue.worker")


@dataclass
class ResumeState:
    folder: Path
    step: int
    metrics_rows: list[dict]  # up to its step


def fetch_resume_state(
    storage: Storage, journal: AttemptJournal, workdir: Path, candidates: list[ResumeCandidate], tries: int
) -> ResumeState | None:
    """One candidate that fails verification (or is gone) is marked unusable and the next older one is tried;
    with none left, None. Storage that cannot be reached is not a verdict on a checkpoint: that raises."""
    archive, tried = workdir / "resume.zip", []
    for checkpoint in candidates:
        try:
            download_verified(storage, checkpoint.key, archive, checkpoint.sha256, tries)
        except (ChecksumMismatch, ObjectNotFound) as exc:
            tried.append(f"step {checkpoint.step}")
            reason = "is missing" if isinstance(exc, ObjectNotFound) else "failed verification"
            mark_unusable(journal, checkpoint)
            log.warning("%s: checkpoint %s %s: %s", journal.job_id, checkpoint.id, reason, exc)
            journal.event(f"The checkpoint at step {checkpoint.step} {reason}; it is marked unusable", level="warn")
            continue
        folder = workdir / "resume"
        zipfile.ZipFile(archive).extractall(folder)
        rows = json.loads((folder / "metrics_rows.json").read_text())
        journal.event(f"Resuming from the checkpoint at step {checkpoint.step} (sha256 verified)")
        return ResumeState(folder, checkpoint.step, [row for row in rows if row["step"] <= checkpoint.step])
    journal.event(
        f"No checkpoint verified (tried {', '.join(tried)}): training starts from the beginning", level="warn"
    )
    return None


def mark_unusable(journal: AttemptJournal, checkpoint: ResumeCandidate) -> None:
    retrying(
        lambda session: execution.mark_checkpoint_unusable(session, journal.job_id, journal.attempt, checkpoint.id),
        f"marking checkpoint {checkpoint.id} unusable",
    )
