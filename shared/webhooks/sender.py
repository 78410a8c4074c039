"""One webhook POST that a receiver cannot turn against the sender:

- one deadline for the whole attempt (resolve, connect, TLS, send, read): a receiver that answers one byte at a
  time is cut off when it passes, however often bytes arrive;
- at most READ_AT_MOST bytes are read from the receiver, status line and headers included; the body is never
  read, the status code is all a delivery needs;
- the connection goes to the address that `destination.resolve` checked (the Host header, TLS SNI and the
  certificate check keep the URL's host name);
- redirects are not followed: a 3xx is a failed attempt;
- what the tenant sees of a failure is a coarse outcome ("could not connect", "timed out", "HTTP 503"), never
  an exception's text or the address a name resolved to; the details are logged here."""

import http.client
import io
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from shared.webhooks import destination

log = logging.getLogger("tunequeue.webhooks")
READ_AT_MOST = 4096

REFUSED = "destination refused: not a public address"
UNRESOLVABLE = "could not resolve the host name"
UNREACHABLE = "could not connect"
TIMED_OUT = "timed out"
TLS_FAILED = "TLS handshake or certificate check failed"
BAD_RESPONSE = "invalid HTTP response"


@dataclass(frozen=True)
class Outcome:
    status_code: int | None
    error: str | None  # None: a 2xx

    @property
    def delivered(self) -> bool:
        return self.error is None


def post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> Outcome:
    deadline = time.monotonic() + timeout
    parts = urlsplit(url)
    host, https = parts.hostname or "", parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    try:
        address = destination.resolve(host, port, timeout)
    except destination.DestinationRefused as exc:
        log.warning("webhook to %s refused: %s", url, exc)
        return Outcome(None, REFUSED)
    except destination.Unresolvable as exc:
        log.info("webhook to %s: %s", url, exc)
        return Outcome(None, UNRESOLVABLE)
    except TimeoutError:
        return Outcome(None, TIMED_OUT)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection = PinnedConnection(host, port, str(address), deadline, ssl.create_default_context() if https else None)
    return connection.post(path, body, headers, url)


class PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to `address` on behalf of `host`, cut off at `deadline` whatever it is doing."""

    def __init__(self, host: str, port: int, address: str, deadline: float, tls: ssl.SSLContext | None):
        super().__init__(host, port, timeout=max(deadline - time.monotonic(), 0.001))
        self.response_class = CappedResponse
        self._address, self._deadline, self._tls = address, deadline, tls
        self._expired = threading.Event()

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), timeout=self._left())
        if self._tls is not None:
            self.sock.settimeout(self._left())
            # The handshake runs once self.sock is the TLS socket, so that the watchdog can cut it off too.
            self.sock = self._tls.wrap_socket(self.sock, server_hostname=self.host, do_handshake_on_connect=False)
            self._left()  # the watchdog may have fired while the socket changed hands
            self.sock.do_handshake()

    def post(self, path: str, body: bytes, headers: dict[str, str], url: str) -> Outcome:
        watchdog = threading.Timer(max(self._deadline - time.monotonic(), 0.0), self._cut_off)
        watchdog.daemon = True
        watchdog.start()
        try:
            self.request("POST", path, body=body, headers=headers)
            status = self.getresponse().status
        except Exception as exc:  # noqa: BLE001 - any failure is a failed attempt; its class picks the coarse text
            outcome = Outcome(None, TIMED_OUT if self._expired.is_set() else _coarse(exc))
            log.info("webhook to %s failed: %s (%s: %s)", url, outcome.error, type(exc).__name__, exc)
            return outcome
        finally:
            watchdog.cancel()
            self.close()
        return _judge(status)

    def _left(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            self._expired.set()
            raise TimeoutError("the attempt's deadline passed")
        return left

    def _cut_off(self) -> None:
        """At the deadline: whatever the connection is blocked on (connect, send, a byte that trickles in)
        returns at once."""
        self._expired.set()
        sock = self.sock
        if sock is not None:
            try:  # the plain socket's shutdown, also under TLS: no close_notify to send to a stalling receiver
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:  # already closed
                pass


class CappedResponse(http.client.HTTPResponse):
    """Reads the status line and headers through a reader that ends after READ_AT_MOST bytes: headers cut short
    still yield the status, and an endless response costs no more than that."""

    def __init__(self, sock: socket.socket, *args, **kwargs):
        super().__init__(sock, *args, **kwargs)
        self.fp.close()  # the socket's own buffered file, which would read 8 KiB at a time
        self.fp = io.BufferedReader(CappedReader(sock, READ_AT_MOST), buffer_size=512)


class CappedReader(io.RawIOBase):
    def __init__(self, sock: socket.socket, limit: int):
        self._sock, self._left = sock, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        if self._left <= 0:
            return 0
        with memoryview(buffer) as view:
            received = self._sock.recv_into(view[: self._left])
        self._left -= received
        return received


def _judge(status: int) -> Outcome:
    if 200 <= status < 300:
        return Outcome(status, None)
    if 300 <= status < 400:
        return Outcome(status, f"redirect not followed (HTTP {status})")
    return Outcome(status, f"HTTP {status}")


def _coarse(exc: Exception) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return TIMED_OUT
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return TLS_FAILED
    if isinstance(exc, http.client.HTTPException):
        return BAD_RESPONSE
    return UNREACHABLE
