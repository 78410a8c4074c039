"""Webhook receivers on loopback for in-process tests, well-behaved or hostile, and the rows a delivery needs."""

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support import free_port

Respond = Callable[[BaseHTTPRequestHandler, "LoopbackReceiver"], None]


class LoopbackReceiver:
    """An HTTP server on 127.0.0.1 that counts the connections it accepts and answers each POST with
    `respond(handler, receiver)`; the default answers `status` (200)."""

    def __init__(self, respond: Respond | None = None, status: int = 200):
        self.connections = 0
        self.received: list[tuple[dict[str, str], bytes, float]] = []  # headers, body, time.monotonic()
        self.stop = threading.Event()
        self.status = status
        receiver, answer = self, respond or _answer_status

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.received.append((headers, body, time.monotonic()))
                try:
                    answer(self, receiver)
                except (BrokenPipeError, ConnectionResetError):  # the sender hung up: as it should
                    pass

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self):
                accepted = super().get_request()
                receiver.connections += 1
                return accepted

        self.server = Server(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()  # shutdown within 50 ms
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}/hooks"

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()

    def events(self) -> list[dict]:
        return [json.loads(body) for _, body, _ in self.received]


def _answer_status(handler: BaseHTTPRequestHandler, receiver: LoopbackReceiver) -> None:
    handler.send_response(receiver.status)
    handler.send_header("content-length", "0")
    handler.end_headers()


def endless_body(handler: BaseHTTPRequestHandler, receiver: LoopbackReceiver) -> None:
    """200 and then a body that never ends, 64 KiB at a time, until the sender hangs up."""
    handler.send_response(200)
    handler.send_header("content-length", str(1 << 40))
    handler.end_headers()
    chunk = b"x" * 65536
    while not receiver.stop.is_set():
        handler.wfile.write(chunk)


def slow_drip(handler: BaseHTTPRequestHandler, receiver: LoopbackReceiver) -> None:
    """The response one byte every 0.2 s, status line first, forever: no single read ever waits long."""
    response = b"HTTP/1.1 200 OK\r\n" + b"x-padding: " + b"y" * 100_000
    for byte in response:
        if receiver.stop.is_set():
            return
        handler.wfile.write(bytes([byte]))
        handler.wfile.flush()
        time.sleep(0.2)


def redirect_to(target: str) -> Respond:
    def respond(handler: BaseHTTPRequestHandler, receiver: LoopbackReceiver) -> None:
        handler.send_response(302)
        handler.send_header("location", target)
        handler.send_header("content-length", "0")
        handler.end_headers()

    return respond


def add_endpoint(tenant: str, url: str, secret: str | None = None) -> str:
    """An endpoint row as the service stores it, without the creation-time URL check: the tests of what is
    refused at send time need endpoints the API would not have taken."""
    from shared import secrets
    from shared.db import session_scope
    from shared.ids import new_id, now
    from shared.webhooks.models import WebhookEndpoint

    secret = secret or "whsec_" + "A" * 43 + "="
    endpoint_id = new_id("wh")
    with session_scope() as session:
        endpoint = WebhookEndpoint(
            id=endpoint_id, tenant=tenant, url=url, created_at=now(), enabled=True, consecutive_failures=0,
            secret=secrets.encrypt(secret),
        )  # fmt: skip
        session.add(endpoint)
    return endpoint_id


def add_delivery(endpoint_id: str, job_id: str = "ftjob-test", next_attempt_at: int | None = None) -> str:
    from shared.db import session_scope
    from shared.ids import new_id, now
    from shared.webhooks.models import WebhookDelivery

    created, delivery_id = now(), new_id("msg")
    with session_scope() as session:
        delivery = WebhookDelivery(
            id=delivery_id, endpoint_id=endpoint_id, job_id=job_id, type="fine_tuning.job.running",
            payload=json.dumps({"object": "event", "type": "fine_tuning.job.running", "data": {"id": job_id}}),
            status="pending", attempts=0, created_at=created, next_attempt_at=next_attempt_at or created, history=[],
        )  # fmt: skip
        session.add(delivery)
    return delivery_id


def delivery_row(delivery_id: str) -> dict:
    from shared.db import session_scope
    from shared.webhooks.models import WebhookDelivery

    with session_scope() as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        assert delivery is not None
        return {c: getattr(delivery, c) for c in ("status", "attempts", "last_status_code", "last_error", "history")}
