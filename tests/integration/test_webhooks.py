"""Every job transition reaches a registered endpoint, signed as OpenAI signs (Standard Webhooks), retried
with backoff when the receiver fails; the official SDK verifies and unwraps what arrives."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from openai import OpenAI
from openai.types.webhooks import FineTuningJobSucceededWebhookEvent

from tests.support import chat, free_port, write_jsonl


class Receiver:
    """A webhook endpoint on 127.0.0.1 that fails its first `failures` requests with 500."""

    def __init__(self, failures: int):
        self.received: list[tuple[dict, bytes, int]] = []
        self.failures = failures
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                status = 500 if len(receiver.received) < receiver.failures else 200
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body, status))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks"


@pytest.fixture
def receiver():
    receiver = Receiver(failures=2)
    yield receiver
    receiver.server.shutdown()


def test_transitions_are_delivered_signed_and_retried(production_env, make_stack, tiny_model, tmp_path, receiver):
    stack = make_stack({**production_env, "TUNEQUEUE_WEBHOOK_RETRY_BASE_SECONDS": "0.2"}, tiny_model)
    created = stack.client.post("/v1/webhooks", json={"url": receiver.url})
    assert created.status_code == 200, created.text
    endpoint, secret = created.json()["id"], created.json()["secret"]
    assert secret.startswith("whsec_") and "secret" not in stack.client.get("/v1/webhooks").json()["data"][0]

    data = write_jsonl(tmp_path / "train.jsonl", [chat(f"q{i}", f"Squawk! {i}") for i in range(12)])
    job = stack.create_job(model="tiny-llama", training_file=stack.upload(data)["id"], hyperparameters={"n_epochs": 1})
    assert stack.wait(job["id"])["status"] == "succeeded"

    expected = ["validating_files", "queued", "running", "succeeded"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        deliveries = stack.client.get(f"/v1/webhooks/{endpoint}/deliveries").json()["data"]
        if len(deliveries) == 4 and all(d["status"] == "delivered" for d in deliveries):
            break
        time.sleep(0.3)
    else:
        pytest.fail(f"deliveries not done: {deliveries}\n{stack.logs()}")
    assert sorted(d["type"] for d in deliveries) == sorted(f"fine_tuning.job.{s}" for s in expected)
    retried = [d for d in deliveries if d["attempts"] > 1]
    assert retried and [h["status_code"] for h in retried[0]["history"]][-1] == 200
    assert 500 in [h["status_code"] for d in retried for h in d["history"]]

    sdk = OpenAI(api_key="unused", base_url="http://127.0.0.1:1/v1")
    accepted = [(h, b) for h, b, status in receiver.received if status == 200]
    assert len(accepted) == 4
    for headers, body in accepted:
        sdk.webhooks.verify_signature(body, headers, secret=secret)
    types = [json.loads(b)["type"] for _, b in sorted(accepted, key=lambda hb: json.loads(hb[1])["created_at"])]
    assert set(types) == {f"fine_tuning.job.{s}" for s in expected}
    # the same webhook-id on a retry lets receivers deduplicate
    ids = [h["webhook-id"] for h, _, _ in receiver.received]
    assert len(set(ids)) == 4 and len(ids) == 6

    headers, body = next((h, b) for h, b in accepted if b"succeeded" in b)
    event = sdk.webhooks.unwrap(body, headers, secret=secret)
    assert isinstance(event, FineTuningJobSucceededWebhookEvent) and event.data.id == job["id"]
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk.webhooks.verify_signature(body.replace(b"succeeded", b"failed"), headers, secret=secret)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk.webhooks.verify_signature(body, headers, secret="whsec_" + "A" * 44)
