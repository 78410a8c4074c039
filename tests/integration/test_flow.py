"""A job from REST to a downloaded adapter, with the API and a Celery worker as real processes:
on Postgres + Redis + S3 (moto), and on the embedded defaults (SQLite + SQLAlchemy broker + local folder)."""

import hashlib
import io
import json
import time
import zipfile

import pytest

from tests.faults import wait_for
from tests.support import chat, extract_zip, generate_in_fresh_process, training_processes, write_jsonl


def parrot_data(tmp_path, n=32, name="train.jsonl"):
    return write_jsonl(
        tmp_path / name, [chat(f"Tell me about item {i}", f"Squawk! Item {i} is fine. Squawk!") for i in range(n)]
    )


def run_job(stack, tmp_path, **overrides):
    file = stack.upload(parrot_data(tmp_path))
    body = {
        "model": "tiny-llama",
        "training_file": file["id"],
        "suffix": "parrot",
        "seed": 11,
        "hyperparameters": {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 10},
        **overrides,
    }
    return file, stack.create_job(**body)


def check_succeeded_job(stack, tiny_model, tmp_path, file, job):
    job = stack.wait(job["id"], timeout=300)
    assert job["status"] == "succeeded", (job["error"], stack.logs())
    assert job["fine_tuned_model"] == f"ft:tiny-llama:parrot:{job['id']}"
    assert job["trained_tokens"] > 0 and job["finished_at"] >= job["created_at"]
    assert job["error"] is None and len(job["result_files"]) == 2

    events = stack.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 200}).json()["data"]
    metrics = [e["data"] for e in events if e["type"] == "metrics"]
    assert metrics and metrics[0]["step"] == metrics[0]["total_steps"] == 24  # newest first: the last step
    assert {"train_loss", "learning_rate", "grad_norm", "epoch", "tokens_per_second", "progress", "eta_seconds"} <= set(
        metrics[0]
    )
    statuses = [
        e["data"]["status"] for e in reversed(events) if e["type"] == "message" and "status" in (e["data"] or {})
    ]
    assert statuses == ["queued", "running", "succeeded"]

    checkpoints = stack.client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    assert [c["step_number"] for c in checkpoints] == [24, 20, 10]  # the delivered adapter is the newest
    assert {"full_valid_loss", "full_valid_mean_token_accuracy"} <= set(checkpoints[0]["metrics"])
    assert "train_loss" in checkpoints[0]["metrics"]

    results = stack.client.get(f"/v1/files/{job['result_files'][0]}/content").text
    assert results.splitlines()[0].startswith("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy")
    assert len(results.splitlines()) == 25
    check_evaluation(stack, job)
    report = job["validation_report"]
    assert report["examples"] == 32 and report["format"] == "chat" and report["loss_tokens"] > 0
    assert "valid_loss" in checkpoints[1]["metrics"]  # step 20 is also an evaluation step

    response = stack.client.get(f"/v1/fine_tuning/jobs/{job['id']}/adapter")
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == response.headers["x-adapter-sha256"]
    names = set(zipfile.ZipFile(io.BytesIO(response.content)).namelist())
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json"} <= names
    adapter = extract_zip(response.content, tmp_path / "adapter")
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["job_id"] == job["id"] and manifest["base_model"] == "tiny-llama"
    assert manifest["dataset"]["sha256"] == hashlib.sha256(parrot_data(tmp_path).read_bytes()).hexdigest()
    assert manifest["hyperparameters"]["n_epochs"] == 3 and manifest["metrics"]["train_loss"] is not None
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= set(manifest["libraries"])

    generated = generate_in_fresh_process(tiny_model, adapter, "Tell me about item 99")
    assert generated["type"] == "PeftModelForCausalLM"
    assert generated["tuned"] != generated["base"]

    models = [m["id"] for m in stack.client.get("/v1/models").json()["data"]]
    assert job["fine_tuned_model"] in models
    return job


def check_evaluation(stack, job):
    """The adapter against the base model: the extension's shape, the same JSON as the second result file, and
    neither shown to another tenant."""
    evaluation = stack.client.get(f"/v1/fine_tuning/jobs/{job['id']}/evaluation").json()
    assert evaluation["object"] == "fine_tuning.job.evaluation" and evaluation["fine_tuning_job_id"] == job["id"]
    assert evaluation["model"] == "tiny-llama" and evaluation["fine_tuned_model"] == job["fine_tuned_model"]
    assert evaluation["validation_examples"] == 2  # 5% of 32 examples held out
    assert set(evaluation["base"]) == {"loss", "token_accuracy"} and evaluation["tuned"]["selection"] == "best"
    assert evaluation["tuned"]["loss"] < evaluation["base"]["loss"] and evaluation["improved"] is True
    assert len(evaluation["samples"]) == 2 and evaluation["max_new_tokens"] == 64
    for sample in evaluation["samples"]:
        assert sample["prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n"), sample
        assert sample["reference"].startswith("Squawk! Item") and {"base", "tuned"} <= set(sample)

    files = [stack.client.get(f"/v1/files/{file_id}").json() for file_id in job["result_files"]]
    assert [f["filename"] for f in files] == [f"{job['id']}_results.csv", f"{job['id']}_evaluation.json"]
    assert {f["purpose"] for f in files} == {"fine-tune-results"}
    assert stack.client.get(f"/v1/files/{job['result_files'][1]}/content").json() == evaluation

    other = {"Authorization": f"Bearer {stack.create_key('someone-else')}"}
    response = stack.client.get(f"/v1/fine_tuning/jobs/{job['id']}/evaluation", headers=other)
    assert response.status_code == 404 and response.json()["error"]["code"] == "job_not_found"
    for file_id in job["result_files"]:
        assert stack.client.get(f"/v1/files/{file_id}/content", headers=other).status_code == 404


def check_evaluation_on_demand(stack, job):
    """A job that succeeded without an evaluation (as before every job was evaluated) gets one on request, made
    by the worker from the delivered adapter on the job's own held-out share: the figures of the one the job
    made, a second request while it runs starts nothing more, and its JSON joins the result files."""
    import sqlalchemy

    path = f"/v1/fine_tuning/jobs/{job['id']}/evaluation"
    made = stack.client.get(path).json()
    job = stack.client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    engine = sqlalchemy.create_engine(stack.env["TUNEQUEUE_DATABASE_URL"])
    with engine.begin() as connection:
        connection.execute(
            sqlalchemy.text("UPDATE jobs SET evaluation = NULL, result_files = CAST(:files AS JSON) WHERE id = :id"),
            {"files": json.dumps(job["result_files"][:1]), "id": job["id"]},
        )
    engine.dispose()
    assert stack.client.get(path).json()["error"]["code"] == "evaluation_not_found"
    assert stack.client.post(path).status_code == 202
    assert stack.client.post(path).json()["status"] in ("queued", "running")

    def finished():
        shown = stack.client.get(path).json()
        return shown if shown["status"] not in ("queued", "running") else None

    again = wait_for(finished, 180, "the evaluation")
    assert again["status"] == "succeeded", again
    assert again["validation_examples"] == made["validation_examples"] and again["tuned"] == {
        **made["tuned"], "loss": pytest.approx(made["tuned"]["loss"], rel=1e-3),
        "token_accuracy": pytest.approx(made["tuned"]["token_accuracy"], abs=0.02),
    }  # fmt: skip
    assert again["base"]["loss"] == pytest.approx(made["base"]["loss"], rel=1e-3)
    assert [s["prompt"] for s in again["samples"]] == [s["prompt"] for s in made["samples"]]
    assert stack.client.post(path).json() == again  # made: returned, not made again
    refreshed = stack.client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert refreshed["result_files"][0] == job["result_files"][0] and len(refreshed["result_files"]) == 2
    assert stack.client.get(f"/v1/files/{refreshed['result_files'][1]}/content").json() == again
    messages = [e["message"] for e in stack.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]]
    assert messages[0].startswith("Evaluation on 2 validation examples")
    assert messages.count("Evaluation against the base model started") == 1  # one run for the two requests
    assert messages[1:3] == ["Evaluation against the base model started", "Evaluation against the base model requested"]


def check_exports(stack, job, tmp_path):
    """A merged export made by the worker loads with plain transformers and answers as its manifest says the model
    as trained does; the adapter export is the adapter; the same export asked for again is the same one;
    another tenant sees none of them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exports = f"/v1/fine_tuning/jobs/{job['id']}/exports"
    job = stack.client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    body = {"format": "merged", "dtype": "bfloat16", "max_loss_drift": 0.02}
    made = stack.client.post(exports, json=body)
    assert made.status_code == 200 and made.json()["status"] in ("queued", "running"), made.text
    export_id = made.json()["id"]
    assert stack.client.post(exports, json=body).json()["id"] == export_id  # the same options: the same export
    bad = stack.client.post(exports, json={"format": "merged", "dtype": "int3"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "dtype", bad.text

    gguf_id = stack.client.post(exports, json={"format": "gguf", "quantization": "q8_0"}).json()["id"]

    def finished(made_id: str):
        shown = stack.client.get(f"{exports}/{made_id}").json()
        return shown if shown["status"] not in ("queued", "running") else None

    export = wait_for(lambda: finished(export_id), 180, "the merged export")
    assert export["status"] == "succeeded", (export, stack.logs())
    assert export["dtype"] == "bfloat16" and export["base_weights"] == "nf4" and export["max_loss_drift"] == 0.02
    assert export["bytes"] > 0
    fidelity = export["fidelity"]
    assert fidelity["passed"] is True and fidelity["loss_drift"] <= 0.01 and fidelity["examples_from"] == "validation"
    content = stack.client.get(f"{exports}/{export_id}/content")
    assert content.status_code == 200 and hashlib.sha256(content.content).hexdigest() == export["sha256"]
    folder = extract_zip(content.content, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert merged.dtype == torch.bfloat16 and tokenizer.chat_template
    sample = fidelity["samples"][0]
    ids = tokenizer(sample["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
    answer = merged.float().generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    assert tokenizer.decode(answer[0, ids.shape[1] :], skip_special_tokens=True).strip() == sample["merged"]

    gguf = wait_for(lambda: finished(gguf_id), 180, "the GGUF export")
    assert gguf["status"] == "succeeded" and gguf["quantization"] == "q8_0" and gguf["fidelity"]["passed"], gguf
    folder = extract_zip(stack.client.get(f"{exports}/{gguf_id}/content").content, tmp_path / "gguf")
    name = f"{job['id']}-q8_0.gguf"
    assert sorted(p.name for p in folder.iterdir()) == sorted([name, "Modelfile", "tunequeue_export.json"])
    from_gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    assert from_gguf.config.num_hidden_layers == merged.config.num_hidden_layers
    assert AutoTokenizer.from_pretrained(folder, gguf_file=name).chat_template == tokenizer.chat_template

    adapter = stack.client.post(exports, json={"format": "adapter"}).json()
    assert (
        adapter["status"] == "succeeded"
        and adapter["sha256"]
        == stack.client.get(f"/v1/fine_tuning/jobs/{job['id']}/adapter").headers["x-adapter-sha256"]
    )
    listed = stack.client.get(exports).json()
    assert [e["id"] for e in listed["data"]] == [adapter["id"], gguf_id, export_id] and listed["has_more"] is False
    other = {"Authorization": f"Bearer {stack.create_key('someone-else')}"}
    for path in (exports, f"{exports}/{export_id}", f"{exports}/{export_id}/content"):
        assert stack.client.get(path, headers=other).status_code == 404
    assert stack.client.post(exports, json={"format": "merged"}, headers=other).status_code == 404
    tenants = {t["tenant"]: t for t in stack.client.get("/admin/overview").json()["storage"]["tenants"]}
    held = tenants["default"]["bytes"]
    assert (
        held >= export["bytes"] + gguf["bytes"] + stack.client.get(f"/v1/files/{job['training_file']}").json()["bytes"]
    )
    # Deleted with the model: the rows, and the objects under the job's prefix.
    assert stack.client.delete(f"/v1/models/{job['fine_tuned_model']}").status_code == 200
    assert stack.client.get(exports).json()["data"] == []
    assert stack.client.get(f"{exports}/{export_id}/content").status_code == 404
    tenants = {t["tenant"]: t for t in stack.client.get("/admin/overview").json()["storage"]["tenants"]}
    assert tenants["default"]["bytes"] <= held - export["bytes"] - gguf["bytes"]


def test_production_stack_end_to_end(production_env, make_stack, tiny_model, tmp_path):
    stack = make_stack({**production_env, "TUNEQUEUE_CHECKPOINT_EVERY_STEPS": "10"}, tiny_model)
    file, job = run_job(stack, tmp_path)
    check_succeeded_job(stack, tiny_model, tmp_path, file, job)
    check_evaluation_on_demand(stack, job)
    check_exports(stack, job, tmp_path)
    ready = stack.client.get("/readyz").json()
    assert ready["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
    overview = stack.client.get("/admin/overview").json()
    assert overview["jobs_by_status"]["succeeded"] == 1 and overview["queue_depth"] == 0
    assert overview["workers"] and overview["workers"][0]["seconds_since_heartbeat"] < 60


def test_embedded_defaults_end_to_end(embedded_env, make_stack, tiny_model, tmp_path):
    stack = make_stack(
        {**embedded_env, "TUNEQUEUE_CHECKPOINT_EVERY_STEPS": "10", "TUNEQUEUE_EXPORT_MAX_LOSS_DRIFT": "0"}, tiny_model
    )
    file, job = run_job(stack, tmp_path)
    check_succeeded_job(stack, tiny_model, tmp_path, file, job)
    data_dir = tmp_path / "embedded"
    assert (data_dir / "tunequeue.db").is_file() and (data_dir / "broker.db").is_file()
    assert list((data_dir / "storage" / "tenants").rglob("adapter.zip"))
    # An export whose fidelity is outside its bound (set to 0 for this stack) fails with its figures and leaves
    # no object behind.
    exports = f"/v1/fine_tuning/jobs/{job['id']}/exports"
    export = stack.client.post(exports, json={"format": "merged", "base_weights": "original"}).json()

    def finished():
        shown = stack.client.get(f"{exports}/{export['id']}").json()
        return shown if shown["status"] not in ("queued", "running") else None

    failed = wait_for(finished, 180, "the failing export")
    assert failed["status"] == "failed" and "outside the bounds" in failed["error"], failed
    assert failed["fidelity"]["passed"] is False and failed["fidelity"]["loss_drift"] > 0
    assert not list((data_dir / "storage").rglob("*ftexport*")) and not list((data_dir / "storage").rglob("exports"))
    assert stack.client.get(f"{exports}/{export['id']}/content").status_code == 409


def test_data_problems_fail_the_job_in_validation(embedded_env, make_stack, tiny_model, tmp_path):
    stack = make_stack(embedded_env, tiny_model)
    long_prompts = write_jsonl(tmp_path / "long.jsonl", [chat(f"word {i} " * 300, "short answer") for i in range(12)])
    too_long = stack.create_job(model="tiny-llama", training_file=stack.upload(long_prompts)["id"], max_seq_length=32)
    too_few = stack.create_job(model="tiny-llama", training_file=stack.upload(parrot_data(tmp_path, n=5))["id"])
    for job_id, fragment in (
        (too_long["id"], "every example is longer than max_seq_length=32"),
        (too_few["id"], "5 examples; at least 10"),
    ):
        job = stack.wait(job_id, timeout=180)
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "invalid_training_file" and fragment in job["error"]["message"]
        assert job["error"]["param"] == "training_file"
        assert job["validation_report"]["error_count"] >= 1 and job["trained_tokens"] is None


def test_cancel_running_job(production_env, make_stack, tiny_model, tmp_path):
    stack = make_stack(production_env, tiny_model)
    file = stack.upload(parrot_data(tmp_path, n=64))
    job = stack.create_job(
        model="tiny-llama", training_file=file["id"], hyperparameters={"n_epochs": 50, "batch_size": 1}
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        current = stack.client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        if current["status"] == "running" and current["progress"]:
            break
        time.sleep(0.3)
    else:
        pytest.fail(f"job never made progress: {current}\n{stack.logs()}")
    assert training_processes(job["id"]), "the recipe should be running"
    time.sleep(1)  # a heartbeat
    workers = stack.client.get("/admin/overview").json()["workers"]
    assert [w["current_jobs"] for w in workers] == [[job["id"]]]
    asked = time.monotonic()
    response = stack.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert response.status_code == 200
    cancelled = stack.wait(job["id"], timeout=15)
    assert cancelled["status"] == "cancelled", cancelled
    assert time.monotonic() - asked < 15
    time.sleep(0.5)
    assert training_processes(job["id"]) == []
    assert stack.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 409
    refused = stack.client.post(f"/v1/fine_tuning/jobs/{job['id']}/exports", json={"format": "merged"})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "export_not_ready", refused.text
