"""Settings refuse impossible values at start-up; the shared retry, checksum and webhook-pool helpers keep
the schedules the services rely on."""

import hashlib
import io
import threading
import time

import pytest

from shared import settings
from shared.checksums import HashingReader, sha256_file, sha256_stream
from shared.storage import ObjectNotFound, StorageError, with_retries
from shared.webhooks.delivery import DeliveryPool
from shared.webhooks.service import retry_delay


def test_negative_sizes_and_timeouts_are_refused_naming_every_variable(monkeypatch):
    monkeypatch.setenv("TUNEQUEUE_MAX_UPLOAD_BYTES", "-1")
    monkeypatch.setenv("TUNEQUEUE_LEASE_SECONDS", "-5")
    settings.get_settings.cache_clear()
    with pytest.raises(settings.InvalidSettings) as refused:
        settings.get_settings()
    message = str(refused.value)
    assert "TUNEQUEUE_MAX_UPLOAD_BYTES='-1'" in message and "TUNEQUEUE_LEASE_SECONDS='-5'" in message


def test_every_setting_keeps_its_flat_name_and_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEQUEUE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TUNEQUEUE_QUEUE_NAME", "q")
    monkeypatch.setenv("TUNEQUEUE_WEBHOOK_WORKERS", "2")
    settings.get_settings.cache_clear()
    loaded = settings.get_settings()
    assert loaded.queue_name == "q" and loaded.webhook_workers == 2 and loaded.resolved_data_dir == tmp_path
    assert loaded.resolved_database_url == f"sqlite:///{tmp_path / 'tunequeue.db'}"
    assert isinstance(loaded, settings.QueueSettings) and isinstance(loaded, settings.StorageSettings)


def test_checksums_agree_with_hashlib(tmp_path):
    data = b"x" * (3 * 1024 * 1024 + 7)
    expected = hashlib.sha256(data).hexdigest()
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == expected
    assert sha256_stream([data[:10], data[10:]]) == expected
    reader = HashingReader(io.BytesIO(data))
    while reader.read(1000):
        pass
    assert reader.size == len(data) and reader.hexdigest() == expected


def test_storage_retries_back_off_then_name_what_failed():
    calls: list[float] = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise OSError("connection reset")
        return "ok"

    assert with_retries(flaky, "uploading k", tries=3, base_delay=0.05) == "ok"
    assert calls[1] - calls[0] >= 0.05 and calls[2] - calls[1] >= 0.1
    with pytest.raises(StorageError, match=r"uploading k failed after 2 tries: OSError: down") as failed:
        with_retries(lambda: (_ for _ in ()).throw(OSError("down")), "uploading k", tries=2, base_delay=0.001)
    assert isinstance(failed.value.__cause__, OSError)


def test_a_missing_object_is_not_retried():
    calls = []

    def missing() -> None:
        calls.append(1)
        raise ObjectNotFound("k")

    with pytest.raises(ObjectNotFound):
        with_retries(missing, "downloading k", tries=5, base_delay=0.001)
    assert calls == [1]


def test_webhook_retry_delay_doubles_with_at_most_a_quarter_of_jitter():
    for n in range(1, 8):
        assert 2.0 * 2 ** (n - 1) <= retry_delay(n, 2.0) <= 2.0 * 2 ** (n - 1) * 1.25


def test_a_waiting_retry_holds_no_sender():
    """One sender: a delivery waiting for its retry must not delay another delivery's first attempt."""
    sent: list[tuple[str, float]] = []
    done = threading.Event()

    def attempt(delivery_id: str) -> tuple[str, float]:
        sent.append((delivery_id, time.monotonic()))
        if delivery_id == "slow" and len([d for d, _ in sent if d == "slow"]) == 1:
            return "pending", 0.5
        if delivery_id == "slow":
            done.set()
        return "delivered", 0.0

    pool = DeliveryPool(attempt, senders=1)
    pool.submit("slow")
    time.sleep(0.05)
    pool.submit("fast")
    assert done.wait(5)
    order = [d for d, _ in sent]
    assert order == ["slow", "fast", "slow"], order
    slow = [at for d, at in sent if d == "slow"]
    assert slow[1] - slow[0] >= 0.5


def test_a_forgotten_pool_sends_nothing_more_once_the_attempt_under_way_ends():
    """What a process drops is left pending for the next worker: no retry, no queued delivery runs after
    `forget`, and `forget` returns only once the attempt under way has ended."""
    sent: list[str] = []
    started, release = threading.Event(), threading.Event()

    def attempt(delivery_id: str) -> tuple[str, float]:
        sent.append(delivery_id)
        if delivery_id == "under-way":
            started.set()
            release.wait(5)
        return "pending", 0.05  # retried every 50 ms until forgotten

    pool = DeliveryPool(attempt, senders=1)
    pool.submit("retried")
    time.sleep(0.2)
    assert sent.count("retried") >= 2
    pool.submit("under-way")
    assert started.wait(5)
    pool.submit("queued")  # behind the attempt under way: one sender
    pool.submit_after("scheduled", 0.3)  # waiting for its time
    assert not pool.forget(wait=0.1)  # the attempt is still under way
    threading.Timer(0.2, release.set).start()
    began = time.monotonic()
    assert pool.forget(wait=5)
    assert time.monotonic() - began >= 0.15, "returned before the attempt under way ended"
    before = list(sent)
    time.sleep(0.3)
    assert sent == before and "queued" not in sent and "scheduled" not in sent, sent
    pool.submit("after")  # the pool still sends what it is given next
    deadline = time.monotonic() + 5
    while "after" not in sent and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "after" in sent
    assert pool.forget(wait=5)
