"""The official `openai` SDK drives tunequeue unmodified: its own methods, its own types, its own errors,
against the API and a Celery worker as real processes on Postgres + Redis + S3 (moto)."""

import hashlib
import io
import time
import zipfile

import openai
import pytest
from openai import OpenAI
from openai.types import FileDeleted, FileObject
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

from tests.support import chat, write_jsonl

METRIC_KEYS = {
    "step",
    "train_loss",
    "train_mean_token_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "full_valid_loss",
    "full_valid_mean_token_accuracy",
}


@pytest.fixture
def sdk(production_env, make_stack, tiny_model):
    env = {**production_env, "TUNEQUEUE_MAX_ACTIVE_JOBS_PER_TENANT": "4"}
    stack = make_stack(env, tiny_model)
    # A tenant key, as users get; no retries: the SDK would otherwise retry 409 and 429 on its own.
    client = OpenAI(base_url=f"http://127.0.0.1:{stack.port}/v1", api_key=stack.create_key("default"), max_retries=0)
    client.stack = stack  # type: ignore[attr-defined]
    return client


def parrot(tmp_path, n=32, name="train.jsonl"):
    return write_jsonl(
        tmp_path / name, [chat(f"Tell me about item {i}", f"Squawk! Item {i}. Squawk!") for i in range(n)]
    )


def wait(client: OpenAI, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout=300) -> FineTuningJob:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.5)
    raise AssertionError(f"{job_id} still {job.status}\n{client.stack.logs()}")  # type: ignore[attr-defined]


def test_files_jobs_events_checkpoints_and_models(sdk, tmp_path):
    training = sdk.files.create(file=parrot(tmp_path).open("rb"), purpose="fine-tune")
    validation = sdk.files.create(file=parrot(tmp_path, 8, "valid.jsonl").open("rb"), purpose="fine-tune")
    assert isinstance(training, FileObject) and training.purpose == "fine-tune" and training.bytes > 0
    assert {f.id for f in sdk.files.list()} >= {training.id, validation.id}
    assert sdk.files.retrieve(training.id).filename == "train.jsonl"
    assert sdk.files.content(training.id).content == parrot(tmp_path).read_bytes()

    job = sdk.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=training.id,
        validation_file=validation.id,
        suffix="sdk",
        seed=3,
        metadata={"team": "ml"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}},
        extra_body={"lora_r": 8, "packing": False},
    )
    assert isinstance(job, FineTuningJob) and job.object == "fine_tuning.job" and isinstance(job.created_at, int)
    assert job.hyperparameters.n_epochs == 2 and job.metadata == {"team": "ml"} and job.seed == 3
    assert job.to_dict()["training_options"]["lora_r"] == 8 and job.to_dict()["training_options"]["packing"] is False
    legacy = sdk.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=training.id,
        hyperparameters={"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 2},
    )
    assert legacy.hyperparameters.learning_rate_multiplier == 2.0
    others = [
        sdk.fine_tuning.jobs.create(
            model="tiny-llama", training_file=training.id, metadata={"team": "x"}, hyperparameters={"n_epochs": 1}
        )
        for _ in range(2)
    ]

    listed = list(sdk.fine_tuning.jobs.list(limit=2))  # auto-pagination over two pages
    assert [j.id for j in listed] == [others[1].id, others[0].id, legacy.id, job.id]
    assert [j.id for j in sdk.fine_tuning.jobs.list(metadata={"team": "ml"})] == [job.id]

    done = wait(sdk, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:tiny-llama:sdk:{job.id}" and done.trained_tokens > 0
    assert isinstance(done.finished_at, int) and done.estimated_finish is None and len(done.result_files) == 2
    assert sdk.files.content(done.result_files[0]).text.startswith("step,train_loss,train_accuracy,valid_loss")
    evaluation = sdk.files.content(done.result_files[1]).json()  # the evaluation against the base model
    assert evaluation == client_get(sdk, f"/fine_tuning/jobs/{job.id}/evaluation").json()
    assert evaluation["object"] == "fine_tuning.job.evaluation" and evaluation["fine_tuning_job_id"] == job.id

    events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=5))  # several pages, newest first
    assert all(isinstance(e, FineTuningJobEvent) for e in events) and len(events) > 10
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)
    assert {e.type for e in events} == {"message", "metrics"}
    assert events[0].message.startswith("The job has successfully completed")
    assert all(e.data and "train_loss" in e.data for e in events if e.type == "metrics")

    checkpoints = list(sdk.fine_tuning.jobs.checkpoints.list(job.id))
    assert all(isinstance(c, FineTuningJobCheckpoint) for c in checkpoints)
    assert set(checkpoints[0].metrics.to_dict()) == METRIC_KEYS and checkpoints[0].fine_tuning_job_id == job.id
    for checkpoint in checkpoints:  # each as a zip, the bytes what was recorded (tunequeue's own route)
        content = client_get(sdk, f"/fine_tuning/jobs/{job.id}/checkpoints/{checkpoint.id}/content")
        assert content.status_code == 200 and content.headers["content-type"] == "application/zip"
        assert hashlib.sha256(content.content).hexdigest() == content.headers["x-checkpoint-sha256"]
        assert "adapter_config.json" in " ".join(zipfile.ZipFile(io.BytesIO(content.content)).namelist())
    assert client_get(sdk, f"/fine_tuning/jobs/{job.id}/checkpoints/ftckpt-nope/content").status_code == 404

    assert done.fine_tuned_model in {m.id for m in sdk.models.list()}
    assert sdk.models.retrieve(done.fine_tuned_model).owned_by == "default"
    assert sdk.models.retrieve("tiny-llama").id == "tiny-llama"
    deleted = sdk.models.delete(done.fine_tuned_model)
    assert deleted.deleted is True
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve(done.fine_tuned_model)
    assert sdk.fine_tuning.jobs.retrieve(job.id).fine_tuned_model == done.fine_tuned_model
    assert client_get(sdk, f"/fine_tuning/jobs/{job.id}/adapter").status_code == 404

    for other in [legacy, *others]:
        wait(sdk, other.id)
    result = sdk.files.delete(validation.id)
    assert isinstance(result, FileDeleted) and result.deleted


def client_get(sdk: OpenAI, path: str):
    return sdk.stack.client.get(f"/v1{path}")  # type: ignore[attr-defined]


def test_pause_and_resume_continue_the_steps(sdk, tmp_path):
    training = sdk.files.create(file=parrot(tmp_path, 200).open("rb"), purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(
        model="tiny-llama", training_file=training.id, hyperparameters={"n_epochs": 2, "batch_size": 1}
    )
    deadline = time.monotonic() + 120
    while (current := sdk.fine_tuning.jobs.retrieve(job.id)).status != "running" or not (
        current.to_dict().get("progress") or {}
    ).get("step", 0) >= 20:
        assert time.monotonic() < deadline, current
        time.sleep(0.2)
    paused = sdk.fine_tuning.jobs.pause(job.id)
    assert paused.status == "running"  # the pause lands after the current step
    paused = wait(sdk, job.id, ("paused", "failed", "succeeded"))
    assert paused.status == "paused", paused.error
    saved_step = sdk.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number
    with pytest.raises(openai.ConflictError):
        sdk.fine_tuning.jobs.pause(job.id)

    assert sdk.fine_tuning.jobs.resume(job.id).status == "queued"
    done = wait(sdk, job.id)
    assert done.status == "succeeded", done.error
    events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=100))[::-1]  # oldest first
    resumed_at = next(i for i, e in enumerate(events) if e.message.startswith("Resumed at step"))
    assert events[resumed_at].message.startswith(f"Resumed at step {saved_step} ")
    later_steps = [e.data["step"] for e in events[resumed_at:] if e.type == "metrics"]
    assert later_steps and min(later_steps) > saved_step and max(later_steps) == 380
    with pytest.raises(openai.ConflictError):
        sdk.fine_tuning.jobs.resume(job.id)


def test_errors_raise_the_sdks_own_classes(sdk, tmp_path):
    training = sdk.files.create(file=parrot(tmp_path).open("rb"), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.fine_tuning.jobs.create(model="gpt-9", training_file=training.id)
    assert bad.value.code == "model_not_available" and bad.value.param == "model" and "tiny-llama" in bad.value.message
    with pytest.raises(openai.AuthenticationError):
        sdk.with_options(api_key="sk-wrong").files.list()
    with pytest.raises(openai.NotFoundError):
        sdk.fine_tuning.jobs.retrieve("ftjob-doesnotexist")
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve("file-doesnotexist")

    job = sdk.fine_tuning.jobs.create(model="tiny-llama", training_file=training.id, hyperparameters={"n_epochs": 1})
    assert sdk.fine_tuning.jobs.cancel(job.id).status == "cancelled"  # still validating or queued: at once
    with pytest.raises(openai.ConflictError) as conflict:
        sdk.fine_tuning.jobs.cancel(job.id)
    assert conflict.value.code == "job_not_cancellable"

    done = wait(
        sdk,
        sdk.fine_tuning.jobs.create(model="tiny-llama", training_file=training.id, hyperparameters={"n_epochs": 1}).id,
    )
    with pytest.raises(openai.UnprocessableEntityError) as unprocessable:
        sdk.fine_tuning.jobs.create(model="tiny-llama", training_file=done.result_files[0])
    assert unprocessable.value.param == "training_file"

    long = sdk.files.create(file=parrot(tmp_path, 200, "long.jsonl").open("rb"), purpose="fine-tune")
    queued = [
        sdk.fine_tuning.jobs.create(
            model="tiny-llama", training_file=long.id, hyperparameters={"n_epochs": 5, "batch_size": 1}
        )
        for _ in range(4)
    ]
    with pytest.raises(openai.RateLimitError) as limited:
        sdk.fine_tuning.jobs.create(model="tiny-llama", training_file=long.id)
    assert limited.value.response.headers["retry-after"] == "60"
    for job in queued:
        sdk.fine_tuning.jobs.cancel(job.id)
    for job in queued:
        assert wait(sdk, job.id, timeout=60).status == "cancelled"
