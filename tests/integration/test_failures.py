"""Failures that say why, through the real worker: a rank's exception fails the job at once with the exception
and the rank in its error, the attempt's log keeps every rank's stderr; a crash nothing reports is retried
once, and fails the job when it repeats at the same step; a checkpoint that fails verification on resume is
skipped for the next older one."""

import os
import stat
import sys
import uuid

import boto3
from sqlalchemy import create_engine, text

from tests.conftest import S3_ENV
from tests.faults import wait_for
from tests.support import ROOT, chat, write_jsonl

FAULT_ENV = {"TUNEQUEUE_SWEEP_SECONDS": "1", "TUNEQUEUE_HEARTBEAT_SECONDS": "1", "TUNEQUEUE_SLOT_WAIT_SECONDS": "0.5"}


def faulty_python(tmp_path) -> str:
    """An executable that runs the recipe with the fault TUNEQUEUE_TEST_FAULT names (tests/faulty_recipe.py)."""
    path = tmp_path / "faulty-python"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "faulty_recipe.py"}" "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def job_body(stack, tmp_path, examples: int = 16, **hyperparameters) -> dict:
    data = write_jsonl(tmp_path / "t.jsonl", [chat(f"Item {i}?", f"Squawk {i}!") for i in range(examples)])
    file_id = stack.upload(data)["id"]
    return {
        "model": "tiny-llama",
        "training_file": file_id,
        "hyperparameters": {"n_epochs": 2, "batch_size": 4, **hyperparameters},
    }


def events_of(stack, job_id: str) -> list[dict]:
    return stack.client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 200}).json()["data"]


def test_a_ranks_exception_fails_the_job_naming_it_and_every_ranks_log_is_kept(
    production_env, make_stack, tiny_model, tmp_path
):
    env = {**production_env, **FAULT_ENV, "TUNEQUEUE_TRAINING_PYTHON": faulty_python(tmp_path)}
    env["TUNEQUEUE_TEST_FAULT"] = "raise:3:1"  # rank 1 of 2 raises after step 3
    stack = make_stack(env, tiny_model, worker=False)
    stack.start_worker("node", "--cpu-slots", "2")
    stack.wait_for_workers(1)
    job = stack.create_job(**job_body(stack, tmp_path), resources={"devices": 2})
    done = stack.wait(job["id"], timeout=300)

    assert done["status"] == "failed" and done["error"]["code"] == "training_error", done
    assert done["error"]["message"] == "ValueError: injected fault after step 3 (rank 1)"
    assert "=====" not in done["error"]["message"]
    events = events_of(stack, job["id"])
    failure = next(e for e in events if e["level"] == "error" and (e["data"] or {}).get("failure"))
    assert failure["data"]["failure"]["step"] == 3
    assert "faulty_recipe.py" in failure["message"]  # the traceback's last frames
    assert not any("requeued" in e["message"] for e in events)  # the job's own failure: no second attempt

    log = stack.client.get(f"/v1/fine_tuning/jobs/{job['id']}/attempts/1/log")
    assert log.status_code == 200 and log.headers["content-type"].startswith("text/plain")
    assert "[default1]:ValueError: injected fault after step 3" in log.text
    assert "[default1]:Traceback (most recent call last):" in log.text
    assert failure["data"]["log"] == f"/v1/fine_tuning/jobs/{job['id']}/attempts/1/log"
    assert stack.client.get(f"/admin/jobs/{job['id']}/attempts/1/log").text == log.text  # admins: any tenant's
    # The tenant's own: another tenant gets the JSON API's 404, and an attempt that never ran has no log.
    other = {"Authorization": f"Bearer {stack.create_key('someone-else')}"}
    assert stack.client.get(f"/v1/fine_tuning/jobs/{job['id']}/attempts/1/log", headers=other).status_code == 404
    missing = stack.client.get(f"/v1/fine_tuning/jobs/{job['id']}/attempts/2/log")
    assert missing.status_code == 404 and "1 attempt(s)" in missing.json()["error"]["message"]


def test_a_crash_repeated_at_the_same_step_is_not_retried(production_env, make_stack, tiny_model, tmp_path):
    env = {**production_env, **FAULT_ENV, "TUNEQUEUE_TRAINING_PYTHON": faulty_python(tmp_path)}
    env.update(TUNEQUEUE_TEST_FAULT="kill:5", TUNEQUEUE_CHECKPOINT_EVERY_STEPS="2", TUNEQUEUE_MAX_ATTEMPTS="3")
    stack = make_stack(env, tiny_model)
    job = stack.create_job(**job_body(stack, tmp_path))
    done = stack.wait(job["id"], timeout=300)

    assert done["status"] == "failed" and done["error"]["code"] == "training_error", done
    message = done["error"]["message"]
    assert "was killed by signal SIGKILL" in message and "at step 5 as in attempt 1" in message, message
    assert "not retried" in message
    events = events_of(stack, job["id"])
    failures = [e["data"]["failure"] for e in events if (e["data"] or {}).get("failure")]
    assert failures == [{"step": 5, "error": "was killed by signal SIGKILL"}] * 2  # attempts 2 and 1, no third
    assert any("Resuming from the checkpoint at step 4" in e["message"] for e in events)
    log = stack.client.get(f"/v1/fine_tuning/jobs/{job['id']}/attempts/2/log")
    assert log.status_code == 200


def test_resume_skips_a_checkpoint_that_fails_verification(production_env, make_stack, tiny_model, tmp_path):
    once, go = tmp_path / "faulted", tmp_path / "go"
    env = {**production_env, **FAULT_ENV, "TUNEQUEUE_TRAINING_PYTHON": faulty_python(tmp_path)}
    env.update(
        TUNEQUEUE_TEST_FAULT="kill:5",
        TUNEQUEUE_TEST_FAULT_ONCE=str(once),
        TUNEQUEUE_TEST_FAULT_GO=str(go),
        TUNEQUEUE_CHECKPOINT_EVERY_STEPS="2",
        TUNEQUEUE_KEEP_CHECKPOINTS="100",  # the rows read after the job ends stay (no sweep collects them)
    )
    stack = make_stack(env, tiny_model)
    job = stack.create_job(**job_body(stack, tmp_path))
    wait_for(once.exists, 120, "the first attempt to reach step 5")
    engine = create_engine(env["TUNEQUEUE_DATABASE_URL"])

    def checkpoints() -> list[dict]:
        with engine.connect() as connection:
            query = "SELECT id, step, storage_key, resumable FROM checkpoints WHERE job_id = :job ORDER BY step"
            return [dict(r) for r in connection.execute(text(query), {"job": job["id"]}).mappings()]

    rows = wait_for(lambda: [r for r in checkpoints() if r["step"] == 4], 60, "the checkpoint at step 4")
    newest = rows[0]
    # Bytes at rest changed under the recorded sha256 (bit rot, a bad copy): the object is no longer the
    # checkpoint that was verified when it was written.
    bucket, prefix = env["TUNEQUEUE_STORAGE_URL"].removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3", endpoint_url=env["TUNEQUEUE_S3_ENDPOINT_URL"], **s3_credentials())
    s3.put_object(
        Bucket=bucket, Key=f"{prefix}/{newest['storage_key']}", Body=b"not the checkpoint " + uuid.uuid4().bytes
    )
    go.touch()  # the first attempt now dies: the next resumes

    done = stack.wait(job["id"], timeout=300)
    assert done["status"] == "succeeded", stack.logs()
    events = [e["message"] for e in events_of(stack, job["id"])]
    assert any("The checkpoint at step 4 failed verification" in m and "marked unusable" in m for m in events)
    assert any("Resuming from the checkpoint at step 2 (sha256 verified)" in m for m in events), events
    after = {r["id"]: r for r in checkpoints()}
    assert after[newest["id"]]["resumable"] is False  # never tried again
    engine.dispose()


def s3_credentials() -> dict:
    return {
        "aws_access_key_id": os.environ.get("AWS_ACCESS_KEY_ID", S3_ENV["AWS_ACCESS_KEY_ID"]),
        "aws_secret_access_key": os.environ.get("AWS_SECRET_ACCESS_KEY", S3_ENV["AWS_SECRET_ACCESS_KEY"]),
        "region_name": "us-east-1",
    }
