"""Limits on what a request may carry: body size (declared or streamed), file lines and line length, and
per-tenant job counts. Each is a 4xx naming the limit and the setting that raises it."""

import json

import pytest
from fastapi.testclient import TestClient

from tests.support import SAMPLE, chat, embedded_in_process, make_key


@pytest.fixture
def client(tmp_path, monkeypatch, tiny_model):
    limits = {"max_request_bytes": "4096", "max_upload_bytes": "200000", "max_file_lines": "300"}
    limits |= {"max_line_bytes": "2000", "max_queued_jobs_per_tenant": "2"}
    embedded_in_process(monkeypatch, tmp_path / "data", tiny_model, **limits)
    from api.app import create_app

    secret = make_key("t")
    with TestClient(create_app(), headers={"Authorization": f"Bearer {secret}"}) as client:
        yield client


def chunks(total: int, size: int = 1024):
    for _ in range(total // size):
        yield b"x" * size


def assert_413(response):
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "payload_too_large" and "limit" in error["message"]


def test_json_body_over_the_limit_with_and_without_content_length(client):
    body = json.dumps({"model": "tiny-llama", "training_file": "f", "suffix": "x" * 5000}).encode()
    assert_413(client.post("/v1/fine_tuning/jobs", content=body, headers={"Content-Type": "application/json"}))
    # chunked: no Content-Length, the limit trips while the body streams in
    response = client.post(
        "/v1/fine_tuning/jobs", content=chunks(64 * 1024), headers={"Content-Type": "application/json"}
    )
    assert_413(response)
    assert client.get("/v1/files").status_code == 200  # and the server is fine


def test_upload_over_the_limit_declared_streamed_and_as_a_file(client):
    big = b'{"text": "' + b"a" * 300_000 + b'"}\n'
    response = client.post("/v1/files", files={"file": ("big.jsonl", big)}, data={"purpose": "fine-tune"})
    assert_413(response)
    response = client.post(
        "/v1/files", content=chunks(400 * 1024), headers={"Content-Type": "multipart/form-data; boundary=xyz"}
    )
    assert_413(response)
    assert client.get("/v1/files").json()["data"] == []  # nothing was stored


def test_line_count_and_line_length_limits_name_their_setting(client):
    many = "".join(json.dumps(chat(f"q{i}", "a")) + "\n" for i in range(301)).encode()
    response = client.post("/v1/files", files={"file": ("many.jsonl", many)}, data={"purpose": "fine-tune"})
    assert response.status_code == 400 and "TUNEQUEUE_MAX_FILE_LINES" in response.json()["error"]["message"]
    long = (json.dumps(chat("q", "a" * 3000)) + "\n").encode() * 12
    response = client.post("/v1/files", files={"file": ("long.jsonl", long)}, data={"purpose": "fine-tune"})
    assert response.status_code == 400 and "2,000-byte limit" in response.json()["error"]["message"]


def test_queued_jobs_per_tenant_limit_is_429_with_retry_after(client):
    with open(SAMPLE / "heldout.jsonl", "rb") as stream:
        file_id = client.post("/v1/files", files={"file": ("t.jsonl", stream)}, data={"purpose": "fine-tune"}).json()[
            "id"
        ]
    body = {"model": "tiny-llama", "training_file": file_id}
    assert [client.post("/v1/fine_tuning/jobs", json=body).status_code for _ in range(2)] == [200, 200]
    response = client.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 429 and int(response.headers["Retry-After"]) > 0
    assert "TUNEQUEUE_MAX_QUEUED_JOBS_PER_TENANT" in response.json()["error"]["message"]
