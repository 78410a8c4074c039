"""Every job transition reaches a registered endpoint, signed as OpenAI signs (Standard Webhooks), retried
with backoff when the receiver fails; the official SDK verifies and unwraps what arrives. A delivery that keeps
failing is given up after its last attempt; one left pending by a process that died is sent by the next worker
to start."""

import itertools
import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from openai import OpenAI
from openai.types.webhooks import FineTuningJobSucceededWebhookEvent

from tests.integration.test_metrics import check_after_one_job
from tests.support import chat, free_port, write_jsonl


class Receiver:
    """A webhook endpoint on 127.0.0.1 that fails its first `failures` requests with 500."""

    def __init__(self, failures: int):
        self.received: list[tuple[dict, bytes, int]] = []
        self.arrivals: list[tuple[str, float]] = []  # (webhook-id, time.monotonic()) per request
        self.failures = failures
        receiver = self
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                with lock:
                    status = 500 if len(receiver.received) < receiver.failures else 200
                    receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body, status))
                    receiver.arrivals.append((self.headers["webhook-id"], time.monotonic()))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()  # shutdown within 50 ms
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks"

    def times(self, webhook_id: str) -> list[float]:
        return [at for wid, at in self.arrivals if wid == webhook_id]


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

    # Prometheus sees the same: the job, the worker, the 4 deliveries and the 2 failed attempts before them.
    check_after_one_job(stack, stack.wait(job["id"]), delivered=4, failed_attempts=2)


def deliveries_of(stack, endpoint: str) -> list[dict]:
    return stack.client.get(f"/v1/webhooks/{endpoint}/deliveries").json()["data"]


def wait_for_delivery(stack, endpoint: str, done, timeout: float = 60) -> dict:
    """The endpoint's only delivery, once `done(delivery)` holds."""
    deadline = time.monotonic() + timeout
    deliveries: list[dict] = []
    while time.monotonic() < deadline:
        deliveries = deliveries_of(stack, endpoint)
        if len(deliveries) == 1 and done(deliveries[0]):
            return deliveries[0]
        time.sleep(0.1)
    pytest.fail(f"delivery not as expected after {timeout}s: {deliveries}\n{stack.logs()}")


def submit_job(stack, tmp_path) -> dict:
    """A job whose creation is the transition `validating_files`, made (and delivered) by the API process."""
    data = write_jsonl(tmp_path / "train.jsonl", [chat(f"q{i}", f"Squawk! {i}") for i in range(12)])
    return stack.create_job(model="tiny-llama", training_file=stack.upload(data)["id"])


MAX_ATTEMPTS = 8


def test_failing_endpoint_retried_with_growing_waits_then_given_up(production_env, make_stack, tiny_model, tmp_path):
    base = 0.02  # retries after 0.02, 0.04, … 1.28 s: the whole schedule in under 3 s
    receiver = Receiver(failures=10**9)
    env = {
        **production_env,
        "TUNEQUEUE_WEBHOOK_RETRY_BASE_SECONDS": str(base),
        "TUNEQUEUE_WEBHOOK_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "TUNEQUEUE_WEBHOOK_DISABLE_AFTER_FAILURES": str(MAX_ATTEMPTS + 1),  # given up before the breaker opens
    }
    stack = make_stack(env, tiny_model, worker=False)  # no worker: the API's delivery is the only one
    endpoint = stack.client.post("/v1/webhooks", json={"url": receiver.url}).json()["id"]
    submit_job(stack, tmp_path)

    delivery = wait_for_delivery(stack, endpoint, lambda d: d["status"] != "pending")
    assert delivery["status"] == "failed" and delivery["attempts"] == MAX_ATTEMPTS, delivery
    assert [h["status_code"] for h in delivery["history"]] == [500] * MAX_ATTEMPTS

    # Backoff, measured where the requests arrive: the n-th wait is base·2^(n-1), stretched by at most a
    # quarter (jitter), plus the time one attempt takes.
    times = receiver.times(delivery["id"])
    assert len(times) == MAX_ATTEMPTS
    waits = [later - earlier for earlier, later in itertools.pairwise(times)]
    planned = [base * 2**n for n in range(MAX_ATTEMPTS - 1)]
    for n, (wait, least) in enumerate(zip(waits, planned, strict=True), start=1):
        assert least <= wait <= least * 1.25 + 1.0, f"wait {n} was {wait:.3f}s, planned {least:.3f}s: {waits}"
    # from 0.3 s on, the doubling outweighs how much one attempt's own time can vary: each wait is longer
    long_waits = [wait for wait, least in zip(waits, planned, strict=True) if least >= 0.3]
    assert len(long_waits) >= 3 and long_waits == sorted(long_waits), waits

    # Given up: nothing more arrives in the time another retry would have taken.
    time.sleep(base * 2 ** (MAX_ATTEMPTS - 1) * 1.25 + 0.5)
    assert len(receiver.times(delivery["id"])) == MAX_ATTEMPTS
    assert deliveries_of(stack, endpoint)[0]["attempts"] == MAX_ATTEMPTS


def test_a_starting_worker_resends_what_a_dead_process_left_pending(production_env, make_stack, tiny_model, tmp_path):
    receiver = Receiver(failures=1)
    # The API's own retry is due 4 s after the first attempt: it is killed well before, and the worker that
    # starts next sends it once due (a worker respects each delivery's next attempt time).
    env = {**production_env, "TUNEQUEUE_WEBHOOK_RETRY_BASE_SECONDS": "4"}
    stack = make_stack(env, tiny_model, worker=False)
    endpoint = stack.client.post("/v1/webhooks", json={"url": receiver.url}).json()["id"]
    submit_job(stack, tmp_path)
    delivery = wait_for_delivery(stack, endpoint, lambda d: d["attempts"] == 1)
    assert delivery["status"] == "pending" and delivery["last_status_code"] == 500

    api = stack.processes[0]
    os.killpg(api.pid, signal.SIGKILL)  # dies between two attempts: nothing in it will send this again
    api.wait(timeout=30)
    first = receiver.times(delivery["id"])[0]
    assert time.monotonic() - first < 3, "the API was not stopped before its own retry"
    stack.start_worker()
    deadline = time.monotonic() + 90
    while len(receiver.times(delivery["id"])) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(receiver.times(delivery["id"])) == 2, f"not re-sent by the new worker\n{stack.logs()}"
    assert receiver.times(delivery["id"])[1] - first >= 4, "re-sent before its next attempt was due"

    stack.start(worker=False)  # the API again, to read what the worker recorded
    resent = next(d for d in deliveries_of(stack, endpoint) if d["id"] == delivery["id"])
    assert resent["status"] == "delivered" and [h["status_code"] for h in resent["history"]] == [500, 200]
