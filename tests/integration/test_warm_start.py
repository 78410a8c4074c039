"""A warm start on the real stack (Postgres, Redis, S3 on moto, a `tunequeue worker`): a job trains in a
recipe process the worker started before the job came, a replacement is started for the next one, a ready
process that died is replaced and never given a job, and tokenised data is reused across jobs over the same
file, but not once max_seq_length changes."""

import os
import signal
from pathlib import Path

import pytest

from tests.faults import wait_for
from tests.support import chat, training_processes, write_jsonl

READY = "Training process ready"
REUSED = "Tokenised examples reused from this worker's cache"
TOKENISED = "Examples tokenised"
# The validation examples are drawn from the training file by seed: jobs that share the seed share the examples.
SEED = 5
ONE_EPOCH = {"n_epochs": 1, "batch_size": 8}


def command_line(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().rstrip(b"\0").decode().split("\0")
    except OSError:
        return []


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def ready_processes(worker_pid: int) -> set[int]:
    """Recipe processes of this worker that wait for a job (`python -m worker.training --ready`): forked by its
    fork server (`--fork-server`, the worker's child), or started by the worker itself."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and "--ready" in command_line(int(entry.name))[3:4]:
            try:
                parent = parent_of(int(entry.name))
                if parent == worker_pid or (is_fork_server(parent) and parent_of(parent) == worker_pid):
                    pids.add(int(entry.name))
            except OSError:
                continue
    return pids


def is_fork_server(pid: int) -> bool:
    return command_line(pid)[1:4] == ["-m", "worker.training", "--fork-server"]


def worker_pid(stack) -> int:
    [worker] = [p for p in stack.processes if "worker" in p.args]
    return worker.pid  # `tunequeue worker` execs Celery: the same pid


def messages(stack, job_id: str) -> list[str]:
    events = stack.client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    return [event["message"] for event in reversed(events)]


def train(stack, file_id: str, **options) -> str:
    job = stack.create_job(model="tiny-llama", training_file=file_id, seed=SEED, hyperparameters=ONE_EPOCH, **options)
    done = stack.wait(job["id"], timeout=300)
    assert done["status"] == "succeeded", (done.get("error"), stack.logs())
    return job["id"]


@pytest.fixture
def stack(make_stack, production_env, tiny_model):
    return make_stack(production_env, tiny_model)


@pytest.fixture
def data_file(stack, tmp_path) -> str:
    records = [chat(f"what is {i} plus {i}? " + "please " * (i % 9), f"{2 * i}") for i in range(24)]
    return stack.upload(write_jsonl(tmp_path / "train.jsonl", records))["id"]


def test_jobs_run_in_ready_processes_and_reuse_tokenised_data(stack, data_file):
    worker = worker_pid(stack)
    ready = wait_for(lambda: ready_processes(worker), 120, "a ready recipe process")

    first = stack.create_job(model="tiny-llama", training_file=data_file, seed=SEED, hyperparameters=ONE_EPOCH)
    recipe = wait_for(lambda: training_processes(first["id"]), 120, "the job's recipe")
    assert recipe[0] in ready, "the job should run in the process that was ready before it was submitted"
    args = command_line(recipe[0])
    assert args[1:4] == ["-m", "worker.training", "--config"] and first["id"] in args[4], args
    replacement = wait_for(lambda: ready_processes(worker) - ready, 120, "the replacement ready process")
    assert stack.wait(first["id"], timeout=300)["status"] == "succeeded", stack.logs()
    said = messages(stack, first["id"])
    assert any(m.startswith(READY) for m in said) and any(m.startswith(TOKENISED) for m in said), said

    second = train(stack, data_file)
    said = messages(stack, second)
    assert any(m.startswith(READY) for m in said), said
    assert any(m.startswith(REUSED) for m in said) and not any(m.startswith(TOKENISED) for m in said), said
    assert not (replacement & ready_processes(worker)), "the replacement should have taken the second job"

    longer = train(stack, data_file, max_seq_length=256)
    said = messages(stack, longer)
    assert any(m.startswith(TOKENISED) for m in said) and not any(m.startswith(REUSED) for m in said), said


def test_a_ready_process_that_died_is_replaced_and_never_used(stack, data_file):
    worker = worker_pid(stack)
    [dead] = wait_for(lambda: ready_processes(worker), 120, "a ready recipe process")
    os.kill(dead, signal.SIGKILL)
    wait_for(lambda: dead not in ready_processes(worker), 10, "the ready process to die")

    job = stack.create_job(model="tiny-llama", training_file=data_file, seed=SEED, hyperparameters=ONE_EPOCH)
    recipe = wait_for(lambda: training_processes(job["id"]), 120, "the job's recipe")
    assert dead not in recipe and parent_of(recipe[0]) == worker
    assert stack.wait(job["id"], timeout=300)["status"] == "succeeded", stack.logs()
    assert not any(m.startswith(READY) for m in messages(stack, job["id"])), "a process started for the job"
    wait_for(lambda: ready_processes(worker) - {dead}, 120, "a new ready process in its place")
