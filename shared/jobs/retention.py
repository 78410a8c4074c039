"""Checkpoint retention, run by the sweeper: every pause and every periodic checkpoint stores a full training
state, and without collection a long or often paused job would hold all of them.

Per job it keeps the newest `keep_checkpoints` resumable checkpoints (a resume tries them newest first, and only
reaches an older one when every newer one failed verification) and every row newer than the oldest of them, the
delivered adapter's row (the adapter is its own object, `adapter.zip`, with the best or last weights copied into
it), and, while the job is paused or queued, the saved state `resume_key` names. What is older than the kept
ones is collected: resumable checkpoints, superseded resume states of earlier pauses, checkpoints marked
unusable.

It is safe beside a running attempt: that attempt only ever adds checkpoints newer than every kept one, so what
is collected stays older than the newest N. It is safe in several sweepers at once: collected rows are first
marked not resumable (so no resume offers them), then their objects are deleted (a missing object is fine),
then the rows; a sweep cut short anywhere leaves rows that the next sweep collects again.

An attempt that ends without its worker (killed, frozen, storage failing) can leave objects it wrote but never
recorded: a checkpoint uploaded just before the worker died. `discard_unrecorded` deletes those once the
attempt no longer owns the job, when the attempt is given up."""

import logging
from dataclasses import dataclass

from sqlalchemy import and_, case, delete, func, or_, select, update
from sqlalchemy.orm import Session

from shared.db import session_scope
from shared.jobs import state
from shared.jobs.models import Checkpoint, Job
from shared.jobs.service import attempt_prefix
from shared.storage import Storage

log = logging.getLogger("tunequeue.retention")
# Per sweep, so that a sweep stays short: a backlog is worked off over the following sweeps.
MAX_JOBS_PER_SWEEP = 50
MAX_CHECKPOINTS_PER_SWEEP = 200
# While the job may still start an attempt from its saved state.
RESUME_STATE_NEEDED = frozenset({state.PAUSED, state.QUEUED})


@dataclass(frozen=True)
class Collectable:
    id: str
    job_id: str
    storage_key: str


def collect_checkpoints(storage: Storage, keep: int, limit: int = MAX_CHECKPOINTS_PER_SWEEP) -> list[str]:
    """Collect up to `limit` checkpoints that retention no longer keeps; returns the ids of those collected."""
    with session_scope() as session:
        victims = checkpoints_to_collect(session, keep, limit)
        if not victims:
            return []
        unoffered = update(Checkpoint).where(Checkpoint.id.in_([v.id for v in victims])).values(resumable=False)
        session.execute(unoffered.execution_options(synchronize_session=False))  # no resume offers them now
    deleted = [victim for victim in victims if _delete_objects(storage, victim)]
    with session_scope() as session:
        forget(session, deleted)
    return [victim.id for victim in deleted]


def checkpoints_to_collect(session: Session, keep: int, limit: int) -> list[Collectable]:
    victims: list[Collectable] = []
    for job_id in jobs_with_collectable_checkpoints(session, keep):
        victims += superseded_checkpoints(session, job_id, keep)
        if len(victims) >= limit:
            break
    return victims[:limit]


def jobs_with_collectable_checkpoints(session: Session, keep: int) -> list[str]:
    """Jobs with more than `keep` resumable checkpoints, or `keep` of them and a non-resumable one that is not
    the adapter (marked unusable, or marked for collection by a sweep cut short)."""
    resumable = func.sum(case((Checkpoint.resumable.is_(True), 1), else_=0))
    not_adapter = or_(Job.adapter_key.is_(None), Checkpoint.storage_key != Job.adapter_key)
    unusable = func.sum(case((and_(Checkpoint.resumable.is_(False), not_adapter), 1), else_=0))
    query = (
        select(Checkpoint.job_id)
        .join(Job, Job.id == Checkpoint.job_id)
        .group_by(Checkpoint.job_id)
        .having(or_(resumable > keep, and_(resumable == keep, unusable > 0)))
        .order_by(Checkpoint.job_id)
        .limit(MAX_JOBS_PER_SWEEP)
    )
    return list(session.scalars(query))


def superseded_checkpoints(session: Session, job_id: str, keep: int) -> list[Collectable]:
    """One job's checkpoints that retention does not keep. Rows and job fields come from one statement, so
    the adapter's row is never seen without the adapter key that protects it."""
    rows = session.execute(
        select(Checkpoint.id, Checkpoint.storage_key, Checkpoint.resumable, Job.status, Job.adapter_key, Job.resume_key)
        .join(Job, Job.id == Checkpoint.job_id)
        .where(Checkpoint.job_id == job_id)
        .order_by(Checkpoint.step.desc(), Checkpoint.created_at.desc())  # the order a resume tries them in
    ).all()
    victims, kept = [], 0
    for row in rows:
        if row.storage_key == row.adapter_key:
            continue
        if row.storage_key == row.resume_key and row.status in RESUME_STATE_NEEDED:
            continue
        if kept < keep:  # not older than the newest `keep` resumable ones
            kept += 1 if row.resumable else 0
            continue
        victims.append(Collectable(row.id, job_id, row.storage_key))
    return victims


def _delete_objects(storage: Storage, victim: Collectable) -> bool:
    """The checkpoint's object and its completion marker; False (kept for the next sweep) if storage refused."""
    try:
        storage.delete(victim.storage_key)
        storage.delete(f"{victim.storage_key}.complete")
    except Exception as exc:  # a backend's own errors too (botocore's): the next sweep tries again
        log.warning("checkpoint %s of %s not collected this sweep: %s", victim.id, victim.job_id, exc)
        return False
    return True


def forget(session: Session, collected: list[Collectable]) -> None:
    """Drop the rows of collected checkpoints; a job whose saved state was collected no longer names it."""
    if not collected:
        return
    rows = delete(Checkpoint).where(Checkpoint.id.in_([c.id for c in collected]))
    session.execute(rows.execution_options(synchronize_session=False))
    for victim in collected:
        session.execute(
            update(Job)
            .where(Job.id == victim.job_id, Job.resume_key == victim.storage_key)
            .values(resume_key=None, resume_sha256=None)
        )


def discard_unrecorded(storage: Storage, job_id: str, attempt: int) -> list[str]:
    """Delete the checkpoints and adapter that `attempt` uploaded but no row records; returns their keys. Only
    once the attempt has lost the job: it can record nothing more then (`execution.is_current`), so an object
    without a row now stays without one. The attempt's log is kept. Best effort: a failure is logged."""
    with session_scope() as session:
        job = session.execute(
            select(Job.tenant, Job.status, Job.attempt, Job.adapter_key).where(Job.id == job_id)
        ).one_or_none()
        if job is None or (job.status == state.RUNNING and job.attempt == attempt):
            return []
        recorded = set(session.scalars(select(Checkpoint.storage_key).where(Checkpoint.job_id == job_id)))
    recorded.add(job.adapter_key)
    prefix = attempt_prefix(job.tenant, job_id, attempt)
    try:
        keys = storage.list_keys(f"{prefix}/checkpoints/") + storage.list_keys(f"{prefix}/adapter.zip")
        unrecorded = [key for key in keys if key.removesuffix(".complete") not in recorded]
        for key in unrecorded:
            storage.delete(key)
    except Exception as exc:  # a backend's own errors too (botocore's)
        log.warning("attempt %d of %s: its unrecorded objects were not deleted: %s", attempt, job_id, exc)
        return []
    if unrecorded:
        log.info("attempt %d of %s: deleted %d unrecorded object(s)", attempt, job_id, len(unrecorded))
    return unrecorded
