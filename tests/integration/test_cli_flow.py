"""The user's command line against a running stack (API + worker as real processes, embedded defaults): upload,
dry run, create, watch to the end, list, download the adapter, and cancel a second job, each command run as a
user runs it, `python -m tunequeue ...` with the server and key in the environment."""

import json
import subprocess
import sys
import zipfile

from tests.support import chat, write_jsonl


def test_a_job_from_the_command_line(embedded_env, make_stack, tiny_model, tmp_path):
    stack = make_stack(embedded_env, tiny_model)
    env = {**stack.env, "TUNEQUEUE_URL": f"http://127.0.0.1:{stack.port}", "TUNEQUEUE_API_KEY": stack.key}

    def tunequeue(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "tunequeue", *args]
        return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    examples = [chat(f"Say hi to {i}", f"Squawk! Hi {i}! Squawk!") for i in range(12)]
    data = write_jsonl(tmp_path / "train.jsonl", examples)
    uploaded = tunequeue("files", "upload", str(data))
    assert uploaded.returncode == 0, uploaded.stderr
    file_id = uploaded.stdout.strip()
    assert file_id.startswith("file-") and "12 chat examples" in uploaded.stderr

    create = ["jobs", "create", "--model", "tiny-llama", "--training-file", file_id, "--epochs", "1"]
    dry_run = tunequeue(*create, "--dry-run")
    assert dry_run.returncode == 0, dry_run.stderr
    assert "Dry run: the data is usable; no job was created" in dry_run.stdout and "n_epochs=1" in dry_run.stdout

    job_id = tunequeue(*create, "--suffix", "cli", "--batch-size", "4", "--seed", "3").stdout.strip()
    second_id = tunequeue(*create).stdout.strip()
    assert job_id.startswith("ftjob-") and second_id.startswith("ftjob-")
    cancelled = tunequeue("jobs", "cancel", second_id)
    assert cancelled.returncode == 0 and second_id in cancelled.stdout, cancelled.stderr

    watched = tunequeue("jobs", "watch", job_id, "--interval", "0.5")
    assert watched.returncode == 0, (watched.stdout, watched.stderr, stack.logs())
    assert f"{job_id} succeeded: ft:tiny-llama:cli:{job_id}" in watched.stdout
    assert "The job has successfully completed" in watched.stdout and "final train loss " in watched.stdout

    listed = json.loads(tunequeue("jobs", "list", "--json").stdout)
    statuses = {job["id"]: job["status"] for job in listed["data"]}
    assert statuses[job_id] == "succeeded"
    assert stack.wait(second_id, timeout=120)["status"] == "cancelled"

    downloaded = tunequeue("jobs", "download", job_id, "-o", "adapter.zip")
    assert downloaded.returncode == 0 and downloaded.stdout == "adapter.zip\n", downloaded.stderr
    names = set(zipfile.ZipFile(tmp_path / "adapter.zip").namelist())
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json"} <= names
    assert sorted(path.name for path in tmp_path.glob("*.zip*")) == ["adapter.zip"]  # no partial file left
