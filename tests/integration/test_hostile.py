"""Hostile uploads against the real API (uvicorn, Postgres, S3): each is refused with a 4xx that says what is
wrong, within bounded time and memory, while the API keeps answering other requests."""

import io
import json
import threading
import time
import zipfile

import httpx
import pytest

from tests.support import chat

VALID = json.dumps(chat("hi", "hello"))


def corpus() -> dict[str, tuple[str, bytes]]:
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("data.jsonl", b"\0" * (200 * 1024 * 1024))  # 200 MB of zeros, about 200 KB zipped
    return {
        "deep nesting": ("deep.jsonl", b"[" * 200_000 + b"]" * 200_000 + b"\n"),
        "huge integer": ("int.jsonl", b'{"text": "a", "n": 1' + b"7" * 100_000 + b"}\n"),
        "NaN": ("nan.jsonl", b'{"prompt": "a", "completion": "b", "weight": NaN}\n'),
        "Infinity": ("inf.jsonl", b'{"prompt": "a", "completion": "b", "weight": -Infinity}\n'),
        "invalid UTF-8": ("utf8.jsonl", b'{"text": "caf\xe9 \xff\xfe"}\n'),
        "raw NUL byte": ("nul.jsonl", b'{"text": "a\x00b"}\n'),
        "NUL in the file name": ("evil\x00name.jsonl", (VALID + "\n").encode() * 12),
        "path in the file name": ("../../../etc/passwd", (VALID + "\n").encode() * 12),
        "escaped NUL in content": ("nul2.jsonl", (json.dumps(chat("a\u0000b", "c\u0000")) + "\n").encode() * 12),
        "a 50 MB single line": ("line.jsonl", b'{"text": "' + b"a" * (50 * 1024 * 1024) + b'"}\n'),
        "a zip bomb renamed .jsonl": ("bomb.jsonl", bomb.getvalue()),
        "10^6 tiny lines": ("tiny.jsonl", b"{}\n" * 1_000_000),
    }


# What each must get: a status, and words the message must contain. 200s are files that are legitimate.
EXPECTED = {
    "deep nesting": (400, "nested too deeply"),
    "huge integer": (400, "not valid JSON"),
    "NaN": (400, "NaN is not a JSON number"),
    "Infinity": (400, "Infinity is not a JSON number"),
    "invalid UTF-8": (400, "not valid UTF-8"),
    "raw NUL byte": (400, "not valid JSON"),
    "NUL in the file name": (200, None),
    "path in the file name": (200, None),
    "escaped NUL in content": (200, None),
    "a 50 MB single line": (400, "byte limit for one example"),
    "a zip bomb renamed .jsonl": (400, "not valid UTF-8"),
    "10^6 tiny lines": (400, "1,000,000"),
}


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.timeout(600)
def test_hostile_uploads_are_refused_cleanly_and_the_api_stays_up(production_env, make_stack, tiny_model):
    stack = make_stack(production_env, tiny_model, worker=False)
    api_pid = stack.processes[0].pid
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:  # another client, meanwhile
        with httpx.Client(base_url=stack.client.base_url, timeout=30) as other:
            while not stop.is_set():
                started = time.monotonic()
                assert other.get("/healthz").status_code == 200
                latencies.append(time.monotonic() - started)
                time.sleep(0.1)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    results = {}
    try:
        for name, (filename, data) in corpus().items():
            started = time.monotonic()
            response = stack.client.post(
                "/v1/files", files={"file": (filename, data)}, data={"purpose": "fine-tune"}, timeout=300
            )
            results[name] = (response, time.monotonic() - started)
    finally:
        stop.set()
        prober.join(timeout=30)

    for name, (status, words) in EXPECTED.items():
        response, seconds = results[name]
        assert response.status_code == status, (name, response.status_code, response.text[:500])
        if words:
            error = response.json()["error"]
            assert words in error["message"] and error["param"] == "file", (name, error)
        assert seconds < 60, (name, seconds)
    # httpx escapes a NUL in a file name; send one raw, as a hostile client would
    boundary = "tqboundary"
    raw = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="raw\x00nul.jsonl"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n{VALID}\n" * 1
        ).encode()
        + (VALID + "\n").encode() * 11
        + f"\r\n--{boundary}--\r\n".encode()
    )
    response = stack.client.post(
        "/v1/files", content=raw, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status_code == 200, response.text
    stored = {f["filename"] for f in stack.client.get("/v1/files").json()["data"]}
    assert stored == {"evil%00name.jsonl", "rawnul.jsonl", "passwd", "nul2.jsonl"}  # no NUL, no folders
    keys = [f"{f['id']}" for f in stack.client.get("/v1/files").json()["data"]]
    assert all(stack.client.get(f"/v1/files/{k}/content").status_code == 200 for k in keys)
    assert max(latencies) < 2.0, f"/healthz took {max(latencies):.2f} s during the uploads"
    peak = peak_rss_mib(api_pid)
    assert peak < 1024, f"the API peaked at {peak:.0f} MiB"
    print(
        f"\nhostile corpus: slowest {max(s for _, s in results.values()):.1f} s, /healthz max "
        f"{max(latencies) * 1000:.0f} ms over {len(latencies)} probes, API peak RSS {peak:.0f} MiB"
    )


def test_declared_and_streamed_oversize_bodies_get_413_from_the_real_server(production_env, make_stack, tiny_model):
    """Through uvicorn (not the in-process client): a huge Content-Length is refused before any body is sent,
    and a chunked body with no Content-Length is cut off once it passes the limit."""
    import socket

    stack = make_stack({**production_env, "TUNEQUEUE_MAX_UPLOAD_BYTES": "1000000"}, tiny_model, worker=False)
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + stack.key.encode() + b"\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000000000\r\n\r\n"
        )
        reply = ""
        while "payload_too_large" not in reply and (data := sock.recv(4096)):
            reply += data.decode()
    assert reply.startswith("HTTP/1.1 413") and "payload_too_large" in reply, reply

    replies = [stream_chunked(stack.port, stack.key) for _ in range(3)]
    # A server that answers before reading the whole body closes the connection with unread data, which
    # the kernel may turn into a reset that swallows the reply: one clean reply in three tries is required,
    # and no reply may be anything but a 413.
    statuses = [reply.split(" ")[1] for reply, _ in replies if reply]
    assert "413" in statuses and set(statuses) == {"413"}, replies
    assert all(sent < 16_000_000 for _, sent in replies), replies  # includes what loopback buffers held
    assert stack.client.get("/v1/files").status_code == 200


def stream_chunked(port: int, key: str) -> tuple[str, int]:
    """POST a well-formed multipart start and then file bytes without end, chunked; return the reply's first
    line (empty if the connection was reset first) and how many bytes went out."""
    import select
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode() + b"\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jsonl"\r\n\r\n'
        sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        chunk = b"10000\r\n" + b"x" * 65536 + b"\r\n"
        sent = 0
        try:
            while sent < 50_000_000:
                if select.select([sock], [], [], 0)[0]:
                    break
                sock.sendall(chunk)
                sent += 65536
            return sock.recv(4096).decode(errors="replace").split("\r\n")[0], sent
        except OSError:
            try:
                return sock.recv(4096).decode(errors="replace").split("\r\n")[0], sent
            except OSError:
                return "", sent
