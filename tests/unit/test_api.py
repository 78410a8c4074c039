"""The API in-process on embedded defaults (SQLite, SQLAlchemy broker, local storage): shapes and bad input.
No worker runs here, so jobs stay in validating_files; the worker paths are in tests/integration."""

import itertools
import json

import pytest
from fastapi.testclient import TestClient

from tests.support import SAMPLE, chat, embedded_in_process, make_key


@pytest.fixture
def client(tmp_path, monkeypatch, tiny_model):
    embedded_in_process(monkeypatch, tmp_path / "data", tiny_model)
    from api.app import create_app

    headers = {"Authorization": f"Bearer {make_key('default', admin=True)}"}
    with TestClient(create_app(), headers=headers) as client:
        yield client


def upload(client, content: bytes, name="train.jsonl", purpose="fine-tune"):
    return client.post("/v1/files", files={"file": (name, content)}, data={"purpose": purpose})


def good_file(client) -> str:
    response = upload(client, (SAMPLE / "train.jsonl").read_bytes())
    assert response.status_code == 200, response.text
    return response.json()["id"]


def assert_error(response, status: int, *fragments: str, param: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in error["message"], error
    if param is not None:
        assert error["param"] == param, error


def test_file_roundtrip(client):
    data = (SAMPLE / "train.jsonl").read_bytes()
    created = upload(client, data).json()
    assert created["object"] == "file" and created["bytes"] == len(data) and created["purpose"] == "fine-tune"
    assert client.get(f"/v1/files/{created['id']}").json() == created
    assert client.get(f"/v1/files/{created['id']}/content").content == data
    listed = client.get("/v1/files").json()
    assert listed["object"] == "list" and [f["id"] for f in listed["data"]] == [created["id"]]
    assert client.delete(f"/v1/files/{created['id']}").json() == {
        "object": "file",
        "id": created["id"],
        "deleted": True,
    }
    assert_error(client.get(f"/v1/files/{created['id']}"), 404, created["id"])


def test_upload_refuses_bad_lines_with_line_numbers(client):
    content = (json.dumps(chat("a", "b")) + "\nnot json\n" + json.dumps({"prompt": "x"}) + "\n").encode()
    assert_error(upload(client, content), 400, "line 2", "line 3", param="file")
    assert_error(upload(client, b""), 400, "empty", param="file")
    assert_error(upload(client, b"\xff\xfe\n"), 400, "UTF-8", "line 1")
    assert_error(upload(client, (SAMPLE / "train.jsonl").read_bytes(), purpose="assistants"), 400, "purpose")
    assert client.get("/v1/files").json()["data"] == []


def test_create_job_shape_and_resolved_hyperparameters(client):
    file_id = good_file(client)
    response = client.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": "tiny-llama",
            "training_file": file_id,
            "suffix": "parrot",
            "seed": 5,
            "metadata": {"team": "ml"},
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
            "lora_r": 8,
        },
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
    assert job["status"] == "validating_files" and job["seed"] == 5 and job["metadata"] == {"team": "ml"}
    hyper = job["hyperparameters"]
    assert {k: hyper[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")} == {
        "n_epochs": 2,
        "batch_size": 8,
        "learning_rate_multiplier": 5.0,
    }
    assert hyper["learning_rate"] == pytest.approx(1e-3) and hyper["lr_scheduler"] == "linear"
    assert hyper["n_evals"] == 5 and hyper["early_stopping_patience"] is None
    assert job["training_options"]["lora_r"] == 8 and job["training_options"]["quantization"] == "nf4"
    assert isinstance(job["created_at"], int) and job["error"] is None and job["fine_tuned_model"] is None
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["id"] == job["id"]
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()
    assert events["data"][0]["object"] == "fine_tuning.job.event"
    assert client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "ml"}).json()["data"][0]["id"] == job["id"]
    assert client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "other"}).json()["data"] == []


def test_unknown_model_lists_available(client):
    response = client.post("/v1/fine_tuning/jobs", json={"model": "gpt-5", "training_file": good_file(client)})
    assert_error(response, 400, "gpt-5", "tiny-llama", param="model")


def test_unknown_file_is_404(client):
    response = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": "file-nope"})
    assert_error(response, 404, "file-nope", param="training_file")
    response = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tiny-llama", "training_file": good_file(client), "validation_file": "file-gone"},
    )
    assert_error(response, 404, param="validation_file")


@pytest.mark.parametrize(
    "body, param, fragment",
    [
        ({"training_file": "file-x"}, "model", "Missing required field"),
        ({"model": "tiny-llama"}, "training_file", "Missing required field"),
        ({"model": "tiny-llama", "training_file": "f", "lora_rank": 4}, "lora_rank", "Unknown field"),
        ({"model": "tiny-llama", "training_file": "f", "quantization": "q3"}, "quantization", "Invalid value"),
        (
            {"model": "tiny-llama", "training_file": "f", "hyperparameters": {"n_epochs": 0}},
            "hyperparameters.n_epochs",
            "1 to 50",
        ),
        ({"model": "tiny-llama", "training_file": "f", "suffix": "has space"}, "suffix", "Invalid value"),
        ({"model": "tiny-llama", "training_file": "f", "lora_dropout": 1.5}, "lora_dropout", "Invalid value"),
    ],
)
def test_bad_fields_are_named(client, body, param, fragment):
    assert_error(client.post("/v1/fine_tuning/jobs", json=body), 400, fragment, param)


def test_malformed_json_is_400(client):
    response = client.post("/v1/fine_tuning/jobs", content=b"{nope", headers={"content-type": "application/json"})
    assert response.status_code == 400


def test_cancel_queued_then_cancel_again_is_409(client):
    job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": good_file(client)}).json()
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    assert_error(client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel"), 409, "cancelled")
    assert_error(client.get(f"/v1/fine_tuning/jobs/{job['id']}/adapter"), 409, "adapter")
    assert_error(client.get(f"/v1/fine_tuning/jobs/{job['id']}/evaluation"), 409, "is cancelled", "when it succeeds")
    assert_error(client.post("/v1/fine_tuning/jobs/ftjob-missing/cancel"), 404)


def test_evaluation_or_why_there_is_none(client):
    from shared.basemodels.models import BaseModelRecord
    from shared.db import session_scope
    from shared.jobs.models import Job

    job_id = client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": good_file(client)}
    ).json()["id"]
    path = f"/v1/fine_tuning/jobs/{job_id}/evaluation"
    assert_error(client.get(path), 409, "validating_files")

    def stored(evaluation: dict | None) -> None:
        with session_scope() as session:
            job = session.get(Job, job_id)
            job.status, job.fine_tuned_model, job.evaluation = "succeeded", f"ft:tiny-llama::{job_id}", evaluation

    assert_error(client.post(path), 409, "validating_files")
    exports = f"/v1/fine_tuning/jobs/{job_id}/exports"
    for status in ("validating_files", "failed", "cancelled"):
        with session_scope() as session:
            session.get(Job, job_id).status = status
        assert_error(client.post(exports, json={"format": "merged"}), 409, status, "only a succeeded job")
    stored(None)  # succeeded before jobs were evaluated
    assert_error(client.get(path), 404, "has no evaluation", f"POST {path}")
    asked_for(client, job_id, path)
    stored({"created_at": 1, "validation_examples": 0, "base": None, "tuned": None, "improved": None, "samples": []})
    assert_error(client.get(path), 404, "no validation examples", "validation_file")
    sample = {"prompt": "<|im_start|>user\nSay 1<|im_end|>\n", "reference": "Squawk!", "base": "1", "tuned": "Squawk!"}
    stored(
        {
            "format": "tunequeue.evaluation/1", "created_at": 5, "validation_examples": 4,
            "base": {"loss": 2.5, "token_accuracy": 0.4},
            "tuned": {"loss": 0.5, "token_accuracy": 0.9, "step": 6, "selection": "best"},
            "improved": True, "samples": [sample], "max_new_tokens": 64, "seconds": 1.5,
        }
    )  # fmt: skip
    with session_scope() as session:
        job = session.get(Job, job_id)
        job.adapter_key, job.adapter_sha256 = f"tenants/default/jobs/{job_id}/attempt-1/adapter.zip", "0" * 64
        base = session.get(BaseModelRecord, "tiny-llama")
        architecture, base.architecture = base.architecture, "Qwen2ForCausalLM"
    assert_error(client.post(exports, json={"format": "gguf"}), 422, "Qwen2ForCausalLM", "merged", param="format")
    assert_error(client.post(exports, json={"format": "gif"}), 400, param="format")
    assert_error(client.post(exports, json={"format": "merged", "bits": 4}), 400, param="bits")
    with session_scope() as session:
        session.get(BaseModelRecord, "tiny-llama").architecture = architecture
    from shared.exports.models import Export
    from shared.queue import queue_depths, train_queue

    queued = client.post(exports, json={"format": "gguf"}).json()
    depth = (queue_depths() or {})[train_queue(1)]
    assert queued["status"] == "queued" and client.post(exports, json={"format": "gguf"}).json()["id"] == queued["id"]
    assert (queue_depths() or {})[train_queue(1)] == depth  # asked again at once: nothing more published
    with session_scope() as session:
        session.get(Export, queued["id"]).lease_expires_at = 0  # no worker took it in time: its message may be lost
    assert client.post(exports, json={"format": "gguf"}).json()["id"] == queued["id"]
    assert (queue_depths() or {})[train_queue(1)] == depth + 1
    assert client.get(path).json() == {
        "object": "fine_tuning.job.evaluation",
        "fine_tuning_job_id": job_id,
        "model": "tiny-llama",
        "fine_tuned_model": f"ft:tiny-llama::{job_id}",
        "status": "succeeded",
        "created_at": 5,
        "validation_examples": 4,
        "base": {"loss": 2.5, "token_accuracy": 0.4},
        "tuned": {"loss": 0.5, "token_accuracy": 0.9, "step": 6, "selection": "best"},
        "improved": True,
        "samples": [sample],
        "max_new_tokens": 64,
        "samples_error": None,
    }


def asked_for(client, job_id: str, path: str) -> None:
    """An evaluation asked for on demand, through each state a worker takes it (`shared.jobs.evaluations`);
    the message is published once however many times it is asked for while on its way."""
    from shared.db import session_scope
    from shared.jobs import evaluations
    from shared.jobs.models import Job
    from shared.queue import EVALUATE_TASK, queue_depths, train_queue, waiting_messages

    def state() -> dict:
        return {k: v for k, v in client.get(path).json().items() if k in ("status", "error")}

    def published() -> int:
        assert (EVALUATE_TASK, job_id) in (waiting_messages() or ())
        return (queue_depths() or {})[train_queue(1)]

    first = client.post(path)
    assert first.status_code == 202 and first.json()["status"] == "queued", first.text
    assert client.post(path).status_code == 202 and published() == 1
    assert state() == {"status": "queued", "error": None}
    with session_scope() as session:
        assert evaluations.claim_evaluation(session, job_id, lease_seconds=60) is not None
        assert evaluations.claim_evaluation(session, job_id, lease_seconds=60) is None  # a duplicate message
    assert state() == {"status": "running", "error": None}
    assert client.post(path).json()["status"] == "running" and published() == 1
    with session_scope() as session:
        evaluations.fail_evaluation(session, job_id, "its process failed: out of memory")
    assert state() == {"status": "failed", "error": "its process failed: out of memory"}
    assert client.post(path).json()["status"] == "queued" and published() == 2  # asked again: started anew
    with session_scope() as session:
        evaluations.claim_evaluation(session, job_id, lease_seconds=60)
        session.get(Job, job_id).evaluation_lease_expires_at = 0  # its worker died
    assert state() == {"status": "failed", "error": evaluations.WORKER_LOST}
    with session_scope() as session:
        job = session.get(Job, job_id)
        job.evaluation_status, job.evaluation_lease_expires_at = None, None
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
    assert [e["message"] for e in events][:5] == [
        "Evaluation against the base model started",
        "Evaluation against the base model requested",
        "Evaluation failed: its process failed: out of memory",
        "Evaluation against the base model started",
        "Evaluation against the base model requested",
    ]


def test_models_health_and_overview(client):
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny-llama"]
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
    overview = client.get("/admin/overview").json()
    assert {"jobs_by_status", "queue_depth", "queue_depths", "workers", "running", "recent_failures"} <= set(overview)
    assert overview["queue_depth"] == sum(overview["queue_depths"].values())
    assert overview["jobs_by_status"]["running"] == 0


def test_pagination_of_jobs(client):
    file_id = good_file(client)
    ids = [
        client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id}).json()["id"]
        for _ in range(3)
    ]
    first = client.get("/v1/fine_tuning/jobs", params={"limit": 2}).json()
    assert first["has_more"] is True and len(first["data"]) == 2
    second = client.get("/v1/fine_tuning/jobs", params={"limit": 2, "after": first["data"][-1]["id"]}).json()
    assert second["has_more"] is False
    assert sorted(j["id"] for j in first["data"] + second["data"]) == sorted(ids)


@pytest.mark.parametrize(
    "body, param, fragment",
    [
        ({"lora_r": 0}, "lora_r", "greater than or equal to 1"),
        ({"hyperparameters": {"n_epochs": -1}}, "hyperparameters.n_epochs", "1 to 50"),
        ({"hyperparameters": {"learning_rate": 2}}, "hyperparameters.learning_rate", "at most 1"),
        ({"hyperparameters": {"lr_scheduler": "step"}}, "hyperparameters.lr_scheduler", "Invalid value"),
        ({"hyperparameters": {"warmup_ratio": 1.5}}, "hyperparameters.warmup_ratio", "Invalid value"),
        ({"adapter_selection": "first"}, "adapter_selection", "Invalid value"),
    ],
)
def test_bad_hyperparameters_are_named(client, body, param, fragment):
    response = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": "f", **body})
    assert_error(response, 400, fragment, param)


def test_unknown_target_module_lists_the_models_modules(client):
    response = client.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": "tiny-llama",
            "training_file": good_file(client),
            "lora_target_modules": ["q_proj", "attn.c_proj"],
        },
    )
    assert_error(response, 400, "attn.c_proj", "q_proj", "up_proj", param="lora_target_modules")
    ok = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tiny-llama", "training_file": good_file(client), "lora_target_modules": "all-linear"},
    )
    assert ok.status_code == 200


def test_dry_run_reports_and_creates_nothing(client):
    response = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tiny-llama", "training_file": good_file(client), "dry_run": True, "max_seq_length": 256},
    )
    assert response.status_code == 200, response.text
    dry = response.json()
    assert dry["object"] == "fine_tuning.job.dry_run" and dry["valid"] is True
    report = dry["report"]
    assert report["format"] == "chat" and report["examples"] == 200
    assert 0 < report["loss_tokens"] < report["total_tokens"]
    assert report["length"]["p50"] <= report["length"]["p95"] <= report["length"]["max"]
    bins = report["length"]["bins"]  # equal widths, end to end, every example in one
    assert sum(b["examples"] for b in bins) == 200 and bins[0]["from"] == 0
    assert all(a["to"] == b["from"] and b["to"] - b["from"] == bins[0]["to"] for a, b in itertools.pairwise(bins))
    assert bins[-1]["from"] <= report["length"]["max"] < bins[-1]["to"]
    assert report["truncated_examples"] == 0 and report["duplicates"] == 0
    sample = report["sample"]
    assert any(s["trained"] and "Squawk!" in s["text"] for s in sample)
    assert any(not s["trained"] and "<|im_start|>user" in s["text"] for s in sample)
    assert dry["estimated_trained_tokens"] == report["total_tokens"] * dry["hyperparameters"]["n_epochs"]
    assert dry["estimated_seconds"] > 0 and dry["estimate_basis"]
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_dry_run_flags_unusable_data(client):
    few = "".join(json.dumps(chat(f"q{i}", "a")) + "\n" for i in range(3)).encode()
    dry = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tiny-llama", "training_file": upload(client, few).json()["id"], "dry_run": True},
    ).json()
    assert dry["valid"] is False and "at least 10" in dry["report"]["errors"][0]["message"]
    long = "".join(json.dumps(chat("word " * 200, "a")) + "\n" for _ in range(12)).encode()
    dry = client.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": "tiny-llama",
            "training_file": upload(client, long).json()["id"],
            "dry_run": True,
            "max_seq_length": 64,
        },
    ).json()
    assert (
        dry["valid"] is False
        and "every example is longer than max_seq_length=64" in dry["report"]["errors"][0]["message"]
    )


def test_upload_keeps_warnings_and_accepts_other_formats(client):
    text = "".join(json.dumps({"text": f"doc {i}"}) + "\r\n" for i in range(12)).encode()
    response = upload(client, b"\xef\xbb\xbf" + text)
    assert response.status_code == 200, response.text
    mixed = (json.dumps({"text": "a"}) + "\n" + json.dumps({"prompt": "p", "completion": "c"}) + "\n").encode()
    assert_error(upload(client, mixed), 400, "line 2", "prompt_completion format")


def _line(record) -> bytes:
    return (record if isinstance(record, str) else json.dumps(record)).encode() + b"\n"


GOOD_LINE = _line(chat("q", "a"))
BAD_UPLOADS = {
    "invalid utf-8": (GOOD_LINE + b'{"text": "\xff"}\n', "line 2", "UTF-8"),
    "not an object": (GOOD_LINE + b"[1, 2]\n", "line 2", "JSON object"),
    "deep nesting": (GOOD_LINE + b"[" * 50_000 + b"]" * 50_000 + b"\n", "line 2", "nested too deeply"),
    "10 MB line": (GOOD_LINE + _line({"text": "x" * 10_000_000}), "line 2", "byte limit"),
    "wrong role": (_line({"messages": [{"role": "robot", "content": "x"}]}), "line 1", "role must be one of"),
    "two user turns": (
        _line(
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "user", "content": "b"},
                    {"role": "assistant", "content": "c"},
                ]
            }
        ),
        "line 1",
        "in a row",
    ),
    "no assistant": (_line({"messages": [{"role": "user", "content": "a"}]}), "line 1", "no assistant"),
    "non-string content": (
        _line({"messages": [{"role": "user", "content": {"a": 1}}, {"role": "assistant", "content": "b"}]}),
        "line 1",
        "must be a string",
    ),
    "empty file": (b"", "", "empty"),
    "only blank lines": (b"\n\n\n", "line 1", "no examples"),
}


@pytest.mark.parametrize("name", BAD_UPLOADS)
def test_bad_uploads_are_refused_with_the_line(client, name):
    data, line, fragment = BAD_UPLOADS[name]
    assert_error(upload(client, data), 400, line, fragment, param="file")
    assert client.get("/v1/files").json()["data"] == []


def test_blank_lines_and_unknown_keys_are_only_warnings(client):
    data = GOOD_LINE + b"\n" + _line({**chat("q", "a"), "id": 3})
    response = upload(client, data)
    assert response.status_code == 200
    validation = response.json()["validation"]
    assert validation["format"] == "chat" and validation["examples"] == 2
    assert [(w["line"], "blank" in w["message"]) for w in validation["warnings"]] == [(2, True), (3, False)]


def test_a_quiet_event_stream_sends_heartbeats_and_ends_at_its_limit(client, monkeypatch):
    """A job with no news: its stream says so with heartbeat comments and closes at its time limit without
    `end` (the job is not finished; the client reconnects)."""
    job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": good_file(client)})
    monkeypatch.setattr("api.streams.HEARTBEAT_SECONDS", 0.3)
    monkeypatch.setattr("api.streams.POLL_SECONDS", 0.1)
    monkeypatch.setenv("TUNEQUEUE_EVENT_STREAM_MAX_SECONDS", "1.5")
    from shared.settings import get_settings

    get_settings.cache_clear()
    body = client.get(f"/v1/fine_tuning/jobs/{job.json()['id']}/events", params={"stream": "true"}).text
    assert body.startswith("retry: 2000\n\nevent: job\n") and body.count(": heartbeat\n\n") >= 2
    assert "event: end" not in body and "\ndata: " in body  # the job's events so far, then quiet


def test_completion_requests_are_refused_by_field_before_any_worker_is_asked(client):
    ask = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]}
    assert_error(client.post("/v1/chat/completions", json={**ask, "n": 9}), 400, "at most 8", param="n")
    assert_error(client.post("/v1/chat/completions", json={**ask, "logprobs": True}), 400, param="logprobs")
    assert_error(client.post("/v1/chat/completions", json={**ask, "tools": [{"type": "function"}]}), 400, param="tools")
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}
    assert_error(
        client.post("/v1/chat/completions", json={**ask, "messages": [image]}), 400, param="messages[0].content"
    )
    assert client.post("/v1/chat/completions", json={**ask, "stop": ["a"] * 5}).status_code == 400
    assert client.post("/v1/chat/completions", json={**ask, "temperature": 3}).status_code == 400
    assert_error(
        client.post("/v1/completions", json={"model": "tiny-llama", "prompt": ["a", "b"]}), 400, param="prompt"
    )
    assert_error(client.post("/v1/chat/completions", json={**ask, "model": "ft:nope"}), 404, "ft:nope", param="model")
    # A well-formed request with no inference worker running says how to start one.
    assert_error(client.post("/v1/chat/completions", json=ask), 503, "tunequeue worker --inference")
