"""The Celery application, configured for long training jobs. It lives in `shared` so the API can publish
tasks by name without importing the worker (and torch); `worker.tasks` registers the task bodies."""

import json
import re
from functools import lru_cache

from celery import Celery

from shared.settings import get_settings

VALIDATE_TASK = "jobs.validate"
TRAIN_TASK = "jobs.train"
EVALUATE_TASK = "jobs.evaluate"  # an evaluation asked for on demand (`shared.jobs.evaluations`)
EXPORT_TASK = "exports.make"  # a job's model exported (`shared.exports.service`)


@lru_cache
def get_celery() -> Celery:
    settings = get_settings()
    app = Celery("tunequeue", broker=settings.resolved_broker_url)
    app.conf.update(
        task_default_queue=settings.queue_name,
        task_acks_late=True,  # a message is acked only after the task returns...
        task_reject_on_worker_lost=True,  # ...and goes back to the queue if the worker dies.
        worker_prefetch_multiplier=1,  # a training job holds its slot; never reserve a second one
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        broker_transport_options=transport_options(settings.resolved_broker_url),
    )
    return app


def transport_options(broker_url: str) -> dict:
    if broker_url.startswith("sqla+"):
        # kombu hands these to create_engine(): wait on a locked SQLite file instead of failing.
        return {"connect_args": {"timeout": 30}}
    return {
        # Redis redelivers an unacked message after the visibility timeout, even to a second worker while the
        # first still trains: keep it above the longest job (the claim makes a duplicate harmless).
        "visibility_timeout": 7 * 24 * 3600,
        # One Redis list per priority level, read in order: job priority is honoured by the broker itself.
        "priority_steps": list(range(10)),
        "queue_order_strategy": "priority",
    }


DEVICE_CLASSES = (1, 2, 4, 8)


def device_class(devices: int) -> int:
    """Jobs are routed by the device count they need, rounded up to a class: a worker with 4 slots consumes
    the 1-, 2- and 4-device queues and never sees an 8-device job."""
    for size in DEVICE_CLASSES:
        if devices <= size:
            return size
    raise ValueError(f"at most {DEVICE_CLASSES[-1]} devices per job")


def train_queue(devices: int) -> str:
    return f"{get_settings().queue_name}.d{device_class(devices)}"


def train_queues_for(slots: int) -> list[str]:
    return [train_queue(size) for size in DEVICE_CLASSES if size <= slots]


def publish(task_name: str, job_id: str) -> None:
    """Validation (and anything not routed by devices) goes to the base queue, which every worker consumes."""
    get_celery().send_task(task_name, args=[job_id], queue=get_settings().queue_name)


def publish_training(job_id: str, devices: int, priority: int) -> None:
    """To the queue of its device class, at its priority (9 = first; kombu's Redis reads level 0 first)."""
    get_celery().send_task(TRAIN_TASK, args=[job_id], queue=train_queue(devices), priority=9 - priority)


def publish_evaluation(job_id: str, priority: int) -> None:
    """Where a one-device job of the same priority goes: it takes a slot as long as it runs."""
    get_celery().send_task(EVALUATE_TASK, args=[job_id], queue=train_queue(1), priority=9 - priority)


def publish_export(export_id: str, priority: int) -> None:
    """As an evaluation: one slot, at its job's priority."""
    get_celery().send_task(EXPORT_TASK, args=[export_id], queue=train_queue(1), priority=9 - priority)


def queue_depth() -> int | None:
    """Messages waiting in the validation and training queues (None if the broker cannot say). A broker that is
    away raises at once: one connection attempt, where kombu's default retries would hold the caller (the admin
    overview, a metrics scrape) for seconds."""
    depths = queue_depths()
    return None if depths is None else sum(depths.values())


def queue_depths() -> dict[str, int] | None:
    """`queue_depth`, queue by queue: the validation queue, then one training queue per device class."""
    queues = [get_settings().queue_name] + [train_queue(size) for size in DEVICE_CLASSES]
    with get_celery().connection_for_read() as connection:
        connection.ensure_connection(max_retries=0)
        channel = connection.default_channel
        # kombu's virtual transports (Redis, SQLAlchemy) count messages with _size, all priority levels
        # included; a passive declare would instead fail on Redis when the queue is empty (no key).
        size = getattr(channel, "_size", None)
        if size is not None:
            return {queue: int(size(queue)) for queue in queues}
        return {queue: int(channel.queue_declare(queue=queue, passive=True).message_count) for queue in queues}


JOB_ID = re.compile(r"ftjob-[0-9a-f]{24}")


def waiting_messages() -> set[tuple[str, str]] | None:
    """(task name, job id) of every message waiting in the training queue, or None if this broker cannot be
    inspected. A message a worker has taken is not waiting: that job is claimed within moments, and a
    duplicate publish is harmless anyway (the claim lets one attempt through)."""
    settings = get_settings()
    url = settings.resolved_broker_url
    queues = [settings.queue_name] + [train_queue(size) for size in DEVICE_CLASSES]
    if url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(url)
        try:
            # kombu keeps one list per priority step: the queue's name, then name + "\x06\x16" + step.
            keys = [k for q in queues for k in [q] + [k.decode() for k in client.scan_iter(match=f"{q}\x06\x16*")]]
            raw = [entry for key in keys for entry in client.lrange(key, 0, -1)]
        finally:
            client.close()
    elif url.startswith("sqla+"):
        from sqlalchemy import bindparam, create_engine, text

        engine = create_engine(url.removeprefix("sqla+"))
        try:
            with engine.connect() as connection:
                raw = list(
                    connection.execute(
                        text(
                            "SELECT m.payload FROM kombu_message m JOIN kombu_queue q ON m.queue_id = q.id "
                            "WHERE q.name IN :queues AND m.visible"
                        ).bindparams(bindparam("queues", expanding=True)),
                        {"queues": queues},
                    ).scalars()
                )
        except Exception:  # no message was ever sent: kombu creates its tables on first use
            raw = []
        finally:
            engine.dispose()
    else:
        return None
    found = set()
    for entry in raw:
        try:
            headers = json.loads(entry)["headers"]
        except (ValueError, KeyError, TypeError):
            continue
        for job_id in JOB_ID.findall(str(headers.get("argsrepr", ""))):
            found.add((headers.get("task", ""), job_id))
    return found


LONGEST_JOB_SECONDS = 3 * 24 * 3600  # the visibility timeout must stay above this


def check_long_job_config(conf) -> list[str]:
    """What in a Celery configuration would lose or duplicate long training jobs (empty: all is well)."""
    problems = []
    if not conf.task_acks_late:
        problems.append("task_acks_late must be True: a message must stay unacked until the job is done")
    if not conf.task_reject_on_worker_lost:
        problems.append("task_reject_on_worker_lost must be True: a killed worker's job must go back to the queue")
    if conf.worker_prefetch_multiplier != 1:
        problems.append("worker_prefetch_multiplier must be 1: a training job must not reserve a second one")
    if not conf.worker_cancel_long_running_tasks_on_connection_loss:
        problems.append("worker_cancel_long_running_tasks_on_connection_loss must be True")
    timeout = (conf.broker_transport_options or {}).get("visibility_timeout")
    if str(conf.broker_url).startswith("redis") and (timeout is None or timeout <= LONGEST_JOB_SECONDS):
        problems.append(
            f"the Redis visibility_timeout ({timeout}) must exceed the longest job "
            f"({LONGEST_JOB_SECONDS} s), or Redis redelivers a job that is still running"
        )
    return problems
