"""The worker refuses to start with a Celery configuration that would lose or duplicate long jobs."""

from celery import Celery

from shared.queue import check_long_job_config, transport_options


def configured(broker: str, **overrides) -> Celery:
    from shared.queue import get_celery

    app = Celery("check", broker=broker)
    app.conf.update({k: v for k, v in get_celery().conf.items() if k.startswith(("task_", "worker_"))})
    app.conf.broker_transport_options = transport_options(broker)
    app.conf.update(overrides)
    return app


def test_tunequeue_config_passes_for_redis_and_sqlalchemy():
    assert check_long_job_config(configured("redis://127.0.0.1:6379/0").conf) == []
    assert check_long_job_config(configured("sqla+sqlite:///x.db").conf) == []


def test_each_unsafe_setting_is_named():
    problems = check_long_job_config(
        configured(
            "redis://127.0.0.1:6379/0",
            task_acks_late=False,
            task_reject_on_worker_lost=False,
            worker_prefetch_multiplier=4,
            broker_transport_options={"visibility_timeout": 3600},
        ).conf
    )
    assert [p.split()[0] for p in problems] == [
        "task_acks_late",
        "task_reject_on_worker_lost",
        "worker_prefetch_multiplier",
        "the",
    ]
    assert "visibility_timeout (3600)" in problems[-1]
