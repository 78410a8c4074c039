"""The Celery application, configured for long training jobs. It lives in `shared` so the API can publish
tasks by name without importing the worker (and torch); `worker.tasks` registers the task bodies."""

from functools import lru_cache

from celery import Celery

from shared.settings import get_settings

VALIDATE_TASK = "jobs.validate"
TRAIN_TASK = "jobs.train"


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
        # Redis redelivers an unacked message after the visibility timeout, even to a second worker while
        # the first still trains: keep it above the longest job (the claim makes a duplicate harmless).
        broker_transport_options={"visibility_timeout": 7 * 24 * 3600, "polling_interval": 0.5},
    )
    return app


def publish(task_name: str, job_id: str) -> None:
    get_celery().send_task(task_name, args=[job_id], queue=get_settings().queue_name)


def queue_depth() -> int | None:
    """Messages waiting in the training queue (None if the broker cannot say)."""
    app = get_celery()
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        declared = channel.queue_declare(queue=get_settings().queue_name, passive=True)
        return int(declared.message_count)
