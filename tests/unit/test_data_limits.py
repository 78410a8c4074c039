"""Bounded work on user data: a chat line costs time linear in its length, lines over the message and token
limits are refused by name, dry runs run in a bounded pool within a deadline and check what the create
checks, uploads stream in bounded memory and bounded number, and downloads carry any file name."""

import json
import threading
import time
import tracemalloc
from urllib.parse import quote

import httpx
import pytest
from fastapi.testclient import TestClient

from shared.datasets.tokenization import ChatTokenizer
from shared.datasets.validation import CHAT, validate_jsonl
from tests.support import SAMPLE, chat, embedded_in_process, free_port, make_key


def conversation(messages: int) -> dict:
    turns = [("user", f"question {i}") if i % 2 == 0 else ("assistant", f"answer {i}") for i in range(messages)]
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def test_a_long_chat_line_costs_time_linear_in_its_messages(tokenizer_dir):
    tokenizer = ChatTokenizer(tokenizer_dir)

    def seconds_per_message(messages: int) -> float:
        record = conversation(messages)
        best = min(_timed(lambda: tokenizer.encode(record, CHAT, 1 << 20)) for _ in range(2))
        return best / messages

    small, large = seconds_per_message(2000), seconds_per_message(8000)
    assert large / small < 2.5, f"{small * 1e6:.1f} vs {large * 1e6:.1f} µs per message at 2,000 vs 8,000"


def _timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def test_a_line_over_the_message_limit_is_refused_naming_the_line_and_the_setting():
    data = (json.dumps(chat("q", "a")) + "\n").encode() * 2 + (json.dumps(conversation(20_000)) + "\n").encode()
    report = validate_jsonl(data, max_messages=1024)  # refused on the count, before any rendering
    assert report.error_count == 1 and report.errors[0].line == 3
    assert "20,000 messages" in report.errors[0].message
    assert "TUNEQUEUE_MAX_MESSAGES_PER_EXAMPLE" in report.errors[0].message


def test_messages_at_the_limit_pass():
    assert validate_jsonl((json.dumps(conversation(1024)) + "\n").encode(), max_messages=1024).ok


@pytest.fixture
def api(tmp_path, monkeypatch, tiny_model):
    settings = {"max_messages_per_example": "64", "max_tokens_per_example": "400", "max_concurrent_dry_runs": "1"}
    settings |= {"max_concurrent_uploads_per_tenant": "1"}
    embedded_in_process(monkeypatch, tmp_path / "data", tiny_model, **settings)
    from api.app import create_app

    tenant_key = make_key("t")
    with TestClient(create_app(), headers={"Authorization": f"Bearer {tenant_key}"}) as client:
        yield client


def upload(client, content: bytes, name: str = "train.jsonl"):
    return client.post("/v1/files", files={"file": (name, content)}, data={"purpose": "fine-tune"})


def sample_file(client) -> str:
    response = upload(client, (SAMPLE / "train.jsonl").read_bytes())
    assert response.status_code == 200, response.text
    return response.json()["id"]


def assert_error(response, status: int, *fragments: str):
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert all(fragment in message for fragment in fragments), message


def test_upload_refuses_a_line_over_the_message_limit(api):
    data = "".join(json.dumps(chat(f"q{i}", "a")) + "\n" for i in range(12)) + json.dumps(conversation(66)) + "\n"
    assert_error(upload(api, data.encode()), 400, "line 13", "TUNEQUEUE_MAX_MESSAGES_PER_EXAMPLE")


def test_data_check_refuses_an_example_over_the_token_limit(api):
    lines = [chat(f"question {i}", "answer") for i in range(12)] + [chat("word " * 600, "answer")]
    file_id = upload(api, "".join(json.dumps(r) + "\n" for r in lines).encode()).json()["id"]
    dry = api.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id, "dry_run": True})
    assert dry.status_code == 200, dry.text
    assert dry.json()["valid"] is False
    error = dry.json()["report"]["errors"][0]
    assert error["line"] == 13 and "TUNEQUEUE_MAX_TOKENS_PER_EXAMPLE" in error["message"]


def test_dry_run_refuses_what_the_create_refuses(api):
    body = {"model": "tiny-llama", "training_file": sample_file(api), "priority": 9}
    assert_error(api.post("/v1/fine_tuning/jobs", json=body), 400, "TUNEQUEUE_MAX_TENANT_PRIORITY")
    dry = api.post("/v1/fine_tuning/jobs", json={**body, "dry_run": True})
    assert_error(dry, 400, "TUNEQUEUE_MAX_TENANT_PRIORITY")
    assert dry.json()["error"]["param"] == "priority"


def test_dry_runs_beyond_the_limit_are_429(api):
    from shared.jobs.estimate import DRY_RUNS

    body = {"model": "tiny-llama", "training_file": sample_file(api), "dry_run": True}
    with DRY_RUNS.hold(1):  # another dry run is in progress in this process
        response = api.post("/v1/fine_tuning/jobs", json=body)
    assert_error(response, 429, "TUNEQUEUE_MAX_CONCURRENT_DRY_RUNS")
    assert int(response.headers["Retry-After"]) > 0
    assert api.post("/v1/fine_tuning/jobs", json=body).status_code == 200  # the slot is free again


def test_dry_run_past_its_deadline_is_refused_naming_the_limit(api, monkeypatch):
    from shared.settings import get_settings

    file_id = sample_file(api)
    monkeypatch.setattr(get_settings(), "dry_run_timeout_seconds", 0.001)
    response = api.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id, "dry_run": True})
    assert_error(response, 408, "TUNEQUEUE_DRY_RUN_TIMEOUT_SECONDS", "create the job")
    from shared.jobs.estimate import DRY_RUNS

    assert DRY_RUNS.running == 0


def test_uploads_beyond_the_tenant_limit_are_429(api):
    from shared.files.service import UPLOADS

    content = (SAMPLE / "train.jsonl").read_bytes()
    with UPLOADS.hold("t", 1):  # one of the tenant's uploads is in flight
        response = upload(api, content)
    assert_error(response, 429, "TUNEQUEUE_MAX_CONCURRENT_UPLOADS_PER_TENANT")
    with UPLOADS.hold("another-tenant", 1):
        assert upload(api, content).status_code == 200


def test_delete_removes_the_stored_object(api):
    from shared.db import session_scope
    from shared.files.models import File
    from shared.storage import get_storage

    file_id = sample_file(api)
    with session_scope() as session:
        key = session.get(File, file_id).storage_key
    assert get_storage().exists(key)
    assert api.delete(f"/v1/files/{file_id}").json()["deleted"] is True
    assert not get_storage().exists(key)


@pytest.mark.parametrize("name", ["数据.jsonl", 'a"b.jsonl', "back\\slash.jsonl"])
def test_downloads_carry_any_file_name(api, name):
    content = (SAMPLE / "train.jsonl").read_bytes()
    file_id = upload(api, content, name=name).json()["id"]
    response = api.get(f"/v1/files/{file_id}/content")
    assert response.status_code == 200 and response.content == content
    stored = api.get(f"/v1/files/{file_id}").json()["filename"]
    disposition = response.headers["content-disposition"]
    assert disposition.endswith(f"filename*=UTF-8''{quote(stored, safe='')}")
    fallback = disposition.split('filename="', 1)[1].split('"; filename*=', 1)[0]
    assert fallback.isascii() and fallback.replace('\\"', "").count('"') == 0


def test_an_upload_streams_in_memory_well_under_its_size(tmp_path, monkeypatch, tiny_model):
    """Through a real server in this process: the upload is spooled to disk and validated line by line."""
    import uvicorn

    embedded_in_process(monkeypatch, tmp_path / "data", tiny_model)
    from api.app import create_app

    line = (json.dumps(chat("q " * 400, "a " * 400)) + "\n").encode()
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as out:
        for _ in range(15 * 1024 * 1024 // len(line)):
            out.write(line)
    size = path.stat().st_size
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    headers = {"Authorization": f"Bearer {make_key('m')}"}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=120) as client:
            while not server.started:
                time.sleep(0.05)
            tracemalloc.start()
            try:
                baseline = tracemalloc.get_traced_memory()[0]
                with open(path, "rb") as stream:
                    response = client.post(
                        "/v1/files", files={"file": ("big.jsonl", stream)}, data={"purpose": "fine-tune"}
                    )
                peak = tracemalloc.get_traced_memory()[1] - baseline
            finally:
                tracemalloc.stop()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["bytes"] == size
    assert peak < size / 4, f"peak {peak:,} bytes over the baseline for a {size:,}-byte upload"
