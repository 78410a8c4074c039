"""Fault injection for the chaos tests: a flaky object store (an HTTP proxy in front of the S3 server), and
restarts of the real Redis and Postgres on this machine.

`FlakyS3(upstream, rule)` asks `rule(method, path, nth)` what to do with each request; `path` is the URL path
(`/<bucket>/<prefix>/<key>`), `nth` counts this method on this path from 1. The rule answers:
- None: forward it;
- "error": answer 503 SlowDown, forward nothing;
- "drop": answer 200 to a write but store nothing (a lost write);
- "tear" on a PUT: forward the object with a run of its bytes inverted, answering as the store does: the
  store keeps bytes that differ from the ones the client sent (a torn write);
- "tear" on a GET: forward the store's answer with a run of the object's bytes inverted (a torn read);
  the object at rest is intact. To make resuming from one checkpoint find it corrupt, tear every read of it:
  `FlakyS3(moto, lambda method, path, nth: "tear" if method == "GET" and path.endswith("/step-10.zip") else None)`.
A tear removes the checksum headers of what it changes (`Content-MD5`, `x-amz-checksum-*`, the payload's
sha256), as a store or proxy that ignores them would: moto checks none of them, but it keeps the client's CRC
and returns it on a GET, where botocore would refuse the torn bytes before the reader's own sha256 check saw
them. `injected` records only tears that took effect: a torn write the store accepted, a torn read that
carried bytes.

`corrupt_object(endpoint, bucket, key)` damages a stored object in place, behind the proxy (bit rot at rest:
every later reader gets the bad bytes, with a checksum that matches them); it returns the original bytes."""

import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}
SLOW_DOWN = b'<?xml version="1.0"?><Error><Code>SlowDown</Code><Message>injected fault</Message></Error>'
TORN_BYTES = 16
CHECKSUM_HEADERS = ("content-md5", "x-amz-checksum-", "x-amz-content-sha256")

# (method, object path, how many times this method hit this path so far, 1-based) -> None, "error", "drop"
# or "tear" (see the module docstring).
Rule = Callable[[str, str, int], str | None]


def tear(data: bytes) -> bytes:
    """The same length, with a run of bytes in the middle inverted."""
    start = len(data) // 2
    run = data[start : start + TORN_BYTES]
    return data[:start] + bytes(b ^ 0xFF for b in run) + data[start + len(run) :]


def without_checksums(headers: dict) -> dict:
    return {k: v for k, v in headers.items() if not k.lower().startswith(CHECKSUM_HEADERS)}


class FlakyS3:
    """Forwards S3 requests to `upstream`, except those `rule` picks to fail."""

    def __init__(self, upstream: str, rule: Rule):
        self.upstream, self.rule = upstream, rule
        self.seen: Counter = Counter()
        self.injected: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, headers: dict, body: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                path = urlsplit(self.path).path
                with proxy.lock:
                    proxy.seen[(self.command, path)] += 1
                    action = proxy.rule(self.command, path, proxy.seen[(self.command, path)])
                if action in ("error", "drop"):
                    proxy.record(self.command, path, action)
                if action == "error":
                    return self._reply(503, {"Content-Type": "application/xml"}, SLOW_DOWN)
                if action == "drop":
                    return self._reply(200, {"ETag": '"00000000000000000000000000000000"'}, b"")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                torn_write = action == "tear" and self.command == "PUT" and bool(body)
                if torn_write:
                    body = tear(body)
                    # The payload's hash is part of the signature; moto checks no signature.
                    headers = {**without_checksums(headers), "x-amz-content-sha256": "UNSIGNED-PAYLOAD"}
                response = httpx.request(
                    self.command, proxy.upstream + self.path, headers=headers, content=body, timeout=60
                )
                if torn_write and response.status_code == 200:
                    proxy.record(self.command, path, action)
                reply_headers, content = dict(response.headers), response.content
                if action == "tear" and self.command == "GET" and response.status_code in (200, 206) and content:
                    reply_headers, content = without_checksums(reply_headers), tear(content)
                    proxy.record(self.command, path, action)
                self._reply(response.status_code, reply_headers, content)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()  # shutdown within 50 ms

    def record(self, method: str, path: str, action: str) -> None:
        with self.lock:
            self.injected.append((method, path, action))

    def count(self, action: str, fragment: str, method: str | None = None) -> int:
        return sum(
            1 for how, path, what in self.injected if what == action and fragment in path and method in (None, how)
        )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def corrupt_object(endpoint: str, bucket: str, key: str) -> bytes:
    """Damage the stored object `key` (the full key, prefix included) in place, straight on the store at
    `endpoint`; returns its original bytes, to put back if needed."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    original = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    client.put_object(Bucket=bucket, Key=key, Body=tear(original))
    return original


def restart_redis(drop_queue: str | None = None) -> float:
    """Stop Redis (nothing saved: every message is gone) and start it as .ci/run does; returns seconds down."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379)
    started = time.monotonic()
    try:
        client.shutdown(nosave=True)
    except redis.ConnectionError:
        pass  # the server closes the connection as it exits
    Path("/var/log/redis").mkdir(parents=True, exist_ok=True)
    Path("/var/lib/redis").mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379", "--save", "",
            "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log",
        ],
        check=True,
    )  # fmt: skip
    wait_for(lambda: _pings(client), 30, "Redis to come back")
    return time.monotonic() - started


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


def postgres_cluster() -> list[str]:
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]
    return ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]


def stop_postgres() -> None:
    subprocess.run([*postgres_cluster(), "stop", "-m", "fast"], check=True, capture_output=True)


def start_postgres() -> None:
    subprocess.run([*postgres_cluster(), "start"], check=True, capture_output=True)


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.2):
    """Poll `condition` until it returns something truthy; that value is returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
