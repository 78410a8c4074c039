"""`celery -A worker.app worker`: the Celery app with tasks registered, plus the worker heartbeat."""

import logging
import os
import threading

from celery import signals

from shared.db import for_workers, session_scope
from shared.ids import now
from shared.jobs import state
from shared.jobs.recovery import sweep
from shared.queue import check_long_job_config
from shared.settings import get_settings
from shared.webhooks.service import record_job_transition, redispatch_pending
from shared.workers import service as workers
from worker import runner, tasks
from worker.runner import warm

app = tasks.app
state.after_transition(record_job_transition)  # the worker's transitions reach webhooks too
_stop = threading.Event()
log = logging.getLogger("tunequeue.worker")


def beat_once(hostname: str, started_at: int) -> None:
    with session_scope() as session:
        workers.record_heartbeat(
            session,
            hostname,
            pid=os.getpid(),
            started_at=started_at,
            current_jobs=sorted(tasks.RUNNING_JOBS),
            info={"queue": get_settings().queue_name, "slots": tasks.get_slots().describe()},
        )


def _heartbeat_loop(hostname: str) -> None:
    started_at = now()
    while not _stop.is_set():
        try:
            beat_once(hostname, started_at)
        except Exception:  # the database may be briefly away; the next beat retries
            pass
        _stop.wait(get_settings().heartbeat_seconds)


def _sweep_loop() -> None:
    """Every worker sweeps: requeue jobs whose lease expired, republish jobs whose message was lost."""
    while not _stop.is_set():
        try:
            sweep()
        except Exception as exc:  # the database or the broker may be briefly away
            log.warning("sweep failed: %s", exc)
        _stop.wait(get_settings().sweep_seconds)


@signals.worker_init.connect
def _refuse_unsafe_config(**_):
    for_workers()
    problems = check_long_job_config(app.conf)
    if problems:
        raise RuntimeError("unsafe Celery configuration for training jobs: " + "; ".join(problems))


@signals.worker_ready.connect
def _start_heartbeat(sender=None, **_):
    redispatch_pending()
    hostname = tasks.worker_name()  # the name its jobs' leases carry
    threading.Thread(target=_heartbeat_loop, args=(hostname,), daemon=True, name="tunequeue-heartbeat").start()
    threading.Thread(target=_sweep_loop, daemon=True, name="tunequeue-sweeper").start()
    warm.start_warm_runtimes(get_settings(), tasks.get_slots())


@signals.worker_shutting_down.connect
def _drain(sig=None, how=None, **_):
    """SIGTERM (warm shutdown): running jobs save their state and go back to the queue for the next worker.
    Celery waits for the tasks to return, which they do once their checkpoint is stored."""
    log.warning("worker shutting down (%s, %s): checkpointing and requeueing running jobs", sig, how)
    runner.SHUTDOWN.set()
    warm.stop_warm_runtimes()  # no job will take them now


@signals.worker_shutdown.connect
def _stop_heartbeat(**_):
    _stop.set()
    warm.stop_warm_runtimes()
