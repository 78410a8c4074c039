"""A receiver cannot hold a sender or its memory: one deadline (TUNEQUEUE_WEBHOOK_TIMEOUT_SECONDS) ends every
attempt however the receiver stalls, at most a few KiB of its answer are read, and a redirect is not followed."""

import threading
import time
from pathlib import Path

import pytest

from shared.webhooks import sender
from tests.support import embedded_in_process
from tests.webhook_receivers import (
    LoopbackReceiver,
    add_delivery,
    add_endpoint,
    delivery_row,
    endless_body,
    redirect_to,
    slow_drip,
)

DEADLINE = 2.0
SLACK = 1.5


@pytest.fixture
def hooks(tmp_path, monkeypatch):
    embedded_in_process(
        monkeypatch, tmp_path / "data", webhook_allowed_networks="127.0.0.0/8",
        webhook_timeout_seconds=str(DEADLINE), webhook_retry_base_seconds="60",
    )  # fmt: skip
    receivers: list[LoopbackReceiver] = []

    def receiver(*args, **kwargs) -> LoopbackReceiver:
        receivers.append(LoopbackReceiver(*args, **kwargs))
        return receivers[-1]

    yield receiver
    for each in receivers:
        each.close()


def rss_bytes() -> int:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024


def attempt_within(delivery_id: str, seconds: float) -> float:
    """Runs one attempt on its own thread; fails the test if it is still running after `seconds`."""
    from shared.webhooks.service import attempt_delivery

    thread = threading.Thread(target=attempt_delivery, args=(delivery_id,), daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the attempt was still running after {seconds}s"
    return time.monotonic() - started


def test_an_endless_body_is_not_read(hooks):
    receiver = hooks(endless_body)
    delivery = add_delivery(add_endpoint("tenant-a", receiver.url))
    before = rss_bytes()
    attempt_within(delivery, DEADLINE + SLACK)
    grown = rss_bytes() - before
    assert grown < 16 * 1024 * 1024, f"RSS grew by {grown / 2**20:.1f} MiB"
    row = delivery_row(delivery)
    assert row["status"] == "delivered" and row["last_status_code"] == 200, row  # the status is all it needs


def test_a_slow_drip_ends_at_the_deadline(hooks):
    receiver = hooks(slow_drip)
    delivery = add_delivery(add_endpoint("tenant-a", receiver.url))
    took = attempt_within(delivery, DEADLINE + SLACK)
    assert took >= DEADLINE - 0.1, took
    row = delivery_row(delivery)
    assert row["status"] == "pending" and row["last_error"] == sender.TIMED_OUT, row


def test_a_redirect_is_not_followed(hooks):
    target = hooks()
    redirecting = hooks(redirect_to(target.url))
    delivery = add_delivery(add_endpoint("tenant-a", redirecting.url))
    attempt_within(delivery, DEADLINE + SLACK)
    row = delivery_row(delivery)
    assert row["last_status_code"] == 302 and row["last_error"] == "redirect not followed (HTTP 302)", row
    assert row["status"] == "pending" and target.connections == 0


def test_a_receiver_that_refuses_or_fails_is_described_coarsely(hooks):
    failing = hooks(status=503)
    closed = hooks()
    closed.close()  # nothing listens on its port any more
    to_failing = add_delivery(add_endpoint("tenant-a", failing.url))
    to_closed = add_delivery(add_endpoint("tenant-a", closed.url))
    attempt_within(to_failing, DEADLINE + SLACK)
    attempt_within(to_closed, DEADLINE + SLACK)
    assert delivery_row(to_failing)["last_error"] == "HTTP 503"
    assert delivery_row(to_closed)["last_error"] == sender.UNREACHABLE  # not "[Errno 111] Connection refused"


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    today = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(today - datetime.timedelta(days=1))
        .not_valid_after(today + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_tls_is_checked_against_the_url_host_name_while_the_checked_address_is_dialled(hooks, tmp_path, monkeypatch):
    import ssl

    cert, key = self_signed(tmp_path, "localhost")
    receiver = hooks()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    receiver.server.socket = context.wrap_socket(receiver.server.socket, server_side=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the sender's default context trusts this one certificate

    by_name = add_delivery(add_endpoint("tenant-a", f"https://localhost:{receiver.port}/hooks"))
    attempt_within(by_name, DEADLINE + SLACK)
    assert delivery_row(by_name)["status"] == "delivered" and len(receiver.received) == 1
    by_address = add_delivery(add_endpoint("tenant-a", f"https://127.0.0.1:{receiver.port}/hooks"))
    attempt_within(by_address, DEADLINE + SLACK)  # the certificate names localhost, not 127.0.0.1
    assert delivery_row(by_address)["last_error"] == sender.TLS_FAILED and len(receiver.received) == 1
