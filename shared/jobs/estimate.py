"""A dry run: everything creating the job would check and resolve, plus how long it would train.

Its data check reads the whole training file through the tokenizer, which is CPU work that grows with the
file: it runs on a thread of its own, at most TUNEQUEUE_MAX_CONCURRENT_DRY_RUNS at once per API process
(beyond that: 429), each within TUNEQUEUE_DRY_RUN_TIMEOUT_SECONDS (past it: 408, pointing to creating the
job, whose validation runs on a worker). The request awaits it without holding a request thread."""

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.basemodels.models import BaseModelRecord
from shared.errors import RateLimited
from shared.jobs import memory
from shared.jobs.datacheck import DataCheck, check_job_data, timed_out
from shared.jobs.hyperparameters import resolve_hyperparameters
from shared.jobs.models import Job
from shared.jobs.schemas import DryRun, JobCreate
from shared.jobs.service import admit_job
from shared.jobs.status import JobStatus
from shared.settings import Settings
from shared.storage import Storage

# Measured here: SmolLM2-135M, NF4 + LoRA, 2 CPU cores (docs/BENCHMARKS.md); scaled by parameter count.
REFERENCE_TOKENS_PER_SECOND = 230.0
REFERENCE_PARAMETERS = 134_515_008
# The data check stops itself at its deadline (checked between lines); the request waits this much longer
# for it before answering alone.
DEADLINE_GRACE_SECONDS = 5.0


class DryRunSlots:
    """Data checks running in this process. A slot is held until the check's thread ends, not until its
    request is answered, so that a check still finishing a line counts against the limit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.running = 0

    def acquire(self, limit: int) -> None:
        with self._lock:
            if self.running >= limit:
                raise RateLimited(
                    f"{self.running} dry runs are in progress on this server, the most at once "
                    f"(TUNEQUEUE_MAX_CONCURRENT_DRY_RUNS={limit}); retry shortly, or create the job: its data is "
                    "validated on a worker",
                    retry_after=5,
                )
            self.running += 1

    def release(self) -> None:
        with self._lock:
            self.running -= 1

    @contextmanager
    def hold(self, limit: int) -> Iterator[None]:
        self.acquire(limit)
        try:
            yield
        finally:
            self.release()


DRY_RUNS = DryRunSlots()


async def dry_run(
    session: Session,
    storage: Storage,
    settings: Settings,
    tenant: str,
    request: JobCreate,
    *,
    max_active: int = 100,
    max_queued: int | None = None,
    max_priority: int = 9,
) -> DryRun:
    """Everything a job would check and resolve, plus estimates; nothing is created. The admission checks
    are the create's own (`admit_job`)."""
    admitted = await asyncio.to_thread(admit_job, session, tenant, request, max_active, max_queued, max_priority)
    hyperparameters = resolve_hyperparameters(request.requested_hyperparameters(), admitted.training.line_count)

    def check(deadline: float) -> DataCheck:
        return check_job_data(
            storage,
            settings,
            admitted.base,
            admitted.training,
            admitted.validation,
            max_seq_length=request.max_seq_length,
            train_on_inputs=request.train_on_inputs,
            deadline=deadline,
        )

    checked = await run_bounded(check, settings)
    refusal = None
    if checked.ok:  # as the job's validation would decide it
        try:
            planned, refusal = await asyncio.to_thread(
                memory.job_plan, session, storage, settings, admitted.base, request.training_options(), checked.report
            )
        except Exception as exc:  # as in validation: an estimate that cannot be made refuses nothing
            planned, refusal = {"unavailable": f"no estimate could be made ({type(exc).__name__})"}, None
        checked.report["memory"] = planned if refusal is None else {**planned, "error": refusal[0],
                                                                    "param": refusal[1]}  # fmt: skip
    tokens = int(checked.report.get("total_tokens", 0)) * hyperparameters["n_epochs"]
    rate, basis = await asyncio.to_thread(throughput_estimate, session, admitted.base)
    return DryRun(
        valid=checked.ok and refusal is None,
        model=admitted.base.id,
        hyperparameters=hyperparameters,
        training_options=request.training_options(),
        report=checked.report,
        estimated_trained_tokens=tokens,
        estimated_seconds=round(tokens / rate, 1),
        estimate_basis=basis,
    )


async def run_bounded(work: Callable[[float], DataCheck], settings: Settings) -> DataCheck:
    """`work(deadline)` on a thread of its own, within the process's dry-run slots and deadline."""
    DRY_RUNS.acquire(settings.max_concurrent_dry_runs)
    deadline = time.monotonic() + settings.dry_run_timeout_seconds
    future: concurrent.futures.Future[DataCheck] = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(work(deadline))
        except BaseException as exc:  # handed to the request, which raises it
            future.set_exception(exc)
        finally:
            DRY_RUNS.release()

    try:
        threading.Thread(target=run, name="dry-run", daemon=True).start()
    except BaseException:
        DRY_RUNS.release()
        raise
    try:
        return await asyncio.wait_for(
            asyncio.wrap_future(future), settings.dry_run_timeout_seconds + DEADLINE_GRACE_SECONDS
        )
    except TimeoutError:
        raise timed_out(settings) from None


def throughput_estimate(session: Session, base: BaseModelRecord) -> tuple[float, str]:
    """Tokens per second for this model: from its finished jobs if any, else scaled from a reference run."""
    recent = session.scalars(
        select(Job)
        .where(Job.model == base.id, Job.status == JobStatus.SUCCEEDED)
        .order_by(Job.finished_at.desc())
        .limit(10)
    ).all()
    rates = [
        j.trained_tokens / (j.finished_at - j.started_at)
        for j in recent
        if j.trained_tokens and j.started_at and j.finished_at and j.finished_at > j.started_at
    ]
    if rates:
        return sum(rates) / len(rates), f"{len(rates)} earlier job(s) of {base.id}, start to finish"
    scaled = REFERENCE_TOKENS_PER_SECOND * REFERENCE_PARAMETERS / max(base.parameters, 1)
    return scaled, "reference run (SmolLM2-135M, NF4 + LoRA, 2 CPU cores) scaled by parameter count"
