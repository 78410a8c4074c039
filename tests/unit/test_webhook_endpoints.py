"""Endpoints as a tenant manages them: a cap per tenant, a circuit breaker that disables an endpoint after
its failures in a row (shown in its listing, re-enabled by its tenant), transitions that reach only their own
tenant's endpoints, and a worker's re-dispatch at start that takes tenants in turn and respects each delivery's
next attempt time. In-process, on the embedded defaults, with the real sender pool and loopback receivers."""

import json
import time

import pytest
from fastapi.testclient import TestClient

from tests.support import embedded_in_process, make_key
from tests.webhook_receivers import LoopbackReceiver, add_delivery, add_endpoint


@pytest.fixture
def world(tmp_path, monkeypatch):
    """Clients of tenants A and B on an app whose webhooks may reach loopback."""
    embedded_in_process(
        monkeypatch, tmp_path / "data", webhook_allowed_networks="127.0.0.0/8", webhook_retry_base_seconds="0.05",
        webhook_disable_after_failures="3", webhook_max_endpoints_per_tenant="2",
    )  # fmt: skip
    from api.app import create_app

    app = create_app()
    clients = {t: TestClient(app, headers={"Authorization": f"Bearer {make_key(f'tenant-{t}')}"}) for t in "ab"}
    receivers: list[LoopbackReceiver] = []

    def receiver(status: int = 200) -> LoopbackReceiver:
        receivers.append(LoopbackReceiver(status=status))
        return receivers[-1]

    yield clients, receiver
    for each in receivers:
        each.close()
    for client in clients.values():
        client.close()


def transition(tenant: str, job_id: str, status: str = "running") -> None:
    """What a job transition records and dispatches after commit (the hook every process registers)."""
    from shared.db import session_scope
    from shared.webhooks.service import record_job_transition

    with session_scope() as session:
        record_job_transition(session, tenant, job_id, status)


def wait_until(check, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"{what} not reached in {timeout}s")


def test_endpoints_per_tenant_are_capped_with_429_naming_the_setting(world):
    clients, receiver = world
    a, b = clients["a"], clients["b"]
    url = receiver().url
    first = a.post("/v1/webhooks", json={"url": url}).json()["id"]
    assert a.post("/v1/webhooks", json={"url": url}).status_code == 200
    refused = a.post("/v1/webhooks", json={"url": url})
    assert refused.status_code == 429 and refused.headers["retry-after"]
    error = refused.json()["error"]
    assert "TUNEQUEUE_WEBHOOK_MAX_ENDPOINTS_PER_TENANT=2" in error["message"] and error["param"] == "url"
    assert b.post("/v1/webhooks", json={"url": url}).status_code == 200  # per tenant: B is not A
    assert a.delete(f"/v1/webhooks/{first}").status_code == 200
    assert a.post("/v1/webhooks", json={"url": url}).status_code == 200


def test_an_endpoint_failing_in_a_row_is_disabled_then_enabled_by_its_tenant(world):
    clients, receiver = world
    a = clients["a"]
    failing = receiver(status=500)
    endpoint = a.post("/v1/webhooks", json={"url": failing.url}).json()["id"]
    transition("tenant-a", "ftjob-1", "queued")
    transition("tenant-a", "ftjob-1", "running")

    shown = wait_until(lambda: (e := a.get(f"/v1/webhooks/{endpoint}").json()) and not e["enabled"] and e, what="off")
    assert shown["disabled_at"] and shown["consecutive_failures"] >= 3, shown
    assert "failed attempts in a row" in shown["disabled_reason"] and "HTTP 500" in shown["disabled_reason"]
    assert f"/v1/webhooks/{endpoint}/enable" in shown["disabled_reason"]

    # An attempt already in flight when the breaker tripped still ends (and counts): wait until none is left.
    def settled():
        deliveries = a.get(f"/v1/webhooks/{endpoint}/deliveries").json()["data"]
        recorded = a.get(f"/v1/webhooks/{endpoint}").json()["consecutive_failures"]
        done = {d["status"] for d in deliveries} == {"failed"} and recorded == len(failing.received)
        return done and sum(d["attempts"] for d in deliveries) == recorded and deliveries

    deliveries = wait_until(settled, what="every attempt sent recorded, both deliveries failed")
    assert len(deliveries) == 2, deliveries
    shown = a.get(f"/v1/webhooks/{endpoint}").json()
    assert a.get("/v1/webhooks").json()["data"] == [shown]  # the listing says so too
    assert all(d["last_error"] == "HTTP 500" or "endpoint was disabled" in d["last_error"] for d in deliveries)
    attempts = len(failing.received)
    assert attempts == shown["consecutive_failures"] and sum(d["attempts"] for d in deliveries) == attempts

    transition("tenant-a", "ftjob-1", "succeeded")  # disabled: nothing recorded, nothing sent
    time.sleep(0.3)
    assert len(a.get(f"/v1/webhooks/{endpoint}/deliveries").json()["data"]) == 2 and len(failing.received) == attempts

    failing.status = 200  # the tenant fixed its receiver
    enabled = a.post(f"/v1/webhooks/{endpoint}/enable").json()
    assert enabled["enabled"] and enabled["consecutive_failures"] == 0
    assert enabled["disabled_at"] is None and enabled["disabled_reason"] is None
    transition("tenant-a", "ftjob-2", "queued")
    delivered = lambda: [d for d in a.get(f"/v1/webhooks/{endpoint}/deliveries").json()["data"] if d["attempts"]]  # noqa: E731
    assert wait_until(lambda: [d["status"] for d in delivered() if d["job_id"] == "ftjob-2"] == ["delivered"])
    assert clients["b"].post(f"/v1/webhooks/{endpoint}/enable").status_code == 404  # A's endpoint, not B's


def test_a_success_resets_the_count_of_failures_in_a_row(world):
    """Each delivery fails twice, then succeeds: 2 failures in a row, never the 3 that disable the endpoint, as
    long as each success resets the count (without the reset, the second delivery's first failure is the 3rd)."""
    clients, _ = world
    a = clients["a"]

    def fail_twice_then_succeed(handler, receiver) -> None:
        handler.send_response(200 if len(receiver.received) % 3 == 0 else 500)
        handler.send_header("content-length", "0")
        handler.end_headers()

    flaky = LoopbackReceiver(fail_twice_then_succeed)
    try:
        endpoint = a.post("/v1/webhooks", json={"url": flaky.url}).json()["id"]
        for attempts, job in ((3, "ftjob-1"), (6, "ftjob-2")):
            transition("tenant-a", job)
            wait_until(lambda n=attempts: len(flaky.received) == n, what=f"{job}'s three attempts")
            wait_until(lambda: a.get(f"/v1/webhooks/{endpoint}").json()["consecutive_failures"] == 0, what="reset")
        shown = a.get(f"/v1/webhooks/{endpoint}").json()
        assert len(flaky.received) == 6 and shown["enabled"] and shown["consecutive_failures"] == 0
    finally:
        flaky.close()


def test_a_tenants_transitions_never_reach_another_tenants_endpoints(world):
    clients, receiver = world
    at_a, at_b = receiver(), receiver()
    a_endpoint = clients["a"].post("/v1/webhooks", json={"url": at_a.url}).json()["id"]
    b_endpoint = clients["b"].post("/v1/webhooks", json={"url": at_b.url}).json()["id"]
    for status in ("queued", "running", "succeeded"):
        transition("tenant-a", "ftjob-of-a", status)
    wait_until(lambda: len(at_a.received) == 3, what="A's three deliveries")
    transition("tenant-b", "ftjob-of-b")
    wait_until(lambda: len(at_b.received) == 1, what="B's delivery")
    time.sleep(0.2)
    assert {e["data"]["id"] for e in at_a.events()} == {"ftjob-of-a"} and len(at_a.received) == 3
    assert [e["data"]["id"] for e in at_b.events()] == ["ftjob-of-b"]
    assert len(clients["b"].get(f"/v1/webhooks/{b_endpoint}/deliveries").json()["data"]) == 1
    assert clients["b"].get(f"/v1/webhooks/{a_endpoint}/deliveries").status_code == 404


def test_redispatch_takes_tenants_in_turn_and_waits_for_each_next_attempt(world):
    from shared.webhooks.delivery import DeliveryPool
    from shared.webhooks.service import attempt_delivery, redispatch_pending

    _, receiver = world
    at = receiver()
    endpoints = {tenant: add_endpoint(f"tenant-{tenant}", at.url) for tenant in "abc"}
    later = int(time.time()) + 2
    for tenant, n in [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2), ("c", 1)]:
        add_delivery(endpoints[tenant], job_id=f"{tenant}{n}")
        time.sleep(0.002)  # ids order by creation
    add_delivery(endpoints["a"], job_id="a-later", next_attempt_at=later)
    time.sleep(0.3)
    assert at.received == []  # left pending by a process that died: nothing sends them until a worker starts

    one_sender = DeliveryPool(attempt_delivery, senders=1)  # one sender: arrivals are in dispatch order
    assert redispatch_pending(one_sender) == 7
    wait_until(lambda: len(at.received) == 7, what="all seven deliveries")
    order = [json.loads(body)["data"]["id"] for _, body, _ in at.received]
    assert order == ["a1", "b1", "c1", "a2", "b2", "a3", "a-later"], order
    arrival_of_later = time.time() - (time.monotonic() - at.received[-1][2])
    assert arrival_of_later >= later - 0.05, "sent before its next attempt was due"


def test_deliveries_held_by_two_processes_are_sent_once_per_attempt(world):
    """A worker that starts while another process still holds a pending delivery (sending it, or waiting for
    its retry) re-dispatches it too: the claim lets one of them send each attempt."""
    from shared.webhooks.delivery import DeliveryPool
    from shared.webhooks.service import attempt_delivery

    _, receiver = world
    failing_once = {"left": 2}

    def fail_twice_then_succeed(handler, at):
        status = 500 if failing_once["left"] > 0 else 200
        failing_once["left"] -= 1
        handler.send_response(status)
        handler.send_header("content-length", "0")
        handler.end_headers()

    at = LoopbackReceiver(respond=fail_twice_then_succeed)
    try:
        endpoint = add_endpoint("tenant-a", at.url)
        ids = [add_delivery(endpoint, job_id=f"job{n}") for n in range(3)]
        pools = [DeliveryPool(attempt_delivery, senders=2) for _ in range(2)]
        for delivery_id in ids:
            for pool in pools:
                pool.submit(delivery_id)
        rows = wait_until(lambda: _settled(ids), timeout=20, what="all three delivered")
        assert [status for status, _ in rows] == ["delivered"] * 3
        time.sleep(0.3)  # nothing more arrives once they are delivered
        per_id: dict[str, int] = {}
        for headers, _, _ in at.received:
            per_id[headers["webhook-id"]] = per_id.get(headers["webhook-id"], 0) + 1
        assert per_id == {delivery_id: attempts for delivery_id, (_, attempts) in zip(ids, rows, strict=True)}, (
            per_id,
            rows,
        )
        assert len(at.received) == 2 + 3  # two failures, then one success each
    finally:
        at.close()


def _settled(ids: list[str]) -> list[tuple[str, int]] | None:
    from shared.db import session_scope
    from shared.webhooks.models import WebhookDelivery

    with session_scope() as session:
        rows = [(d.status, d.attempts) for d in (session.get(WebhookDelivery, i) for i in ids)]
    return rows if all(status != "pending" for status, _ in rows) else None
