"""Keys verified recently are trusted without a query for TUNEQUEUE_API_KEY_CACHE_SECONDS, and never past
their expiry or their revocation through this process."""

import time

import pytest
from fastapi.testclient import TestClient

from shared.ids import now
from tests.support import embedded_in_process


@pytest.fixture
def cached_api(tmp_path, monkeypatch):
    """The API on SQLite with the key cache on (it is off by default there), and a way to count key reads."""
    embedded_in_process(monkeypatch, tmp_path / "data", api_key_cache_seconds="30")
    from api.app import create_app
    from shared.auth import service

    reads = []
    real = service.authenticate
    monkeypatch.setattr("api.deps.authenticate", lambda *a, **k: reads.append(1) or real(*a, **k))
    yield create_app(), reads
    service.VERIFIED.clear()


def new_key(tenant: str = "t", admin: bool = False, expires_in: int | None = None) -> tuple[str, str]:
    from shared.auth.service import create_key
    from shared.db import session_scope

    with session_scope() as session:
        key, secret = create_key(session, tenant, admin=admin, expires_in=expires_in)
        return key.id, secret


def test_a_verified_key_is_read_once_within_the_ttl(cached_api):
    app, reads = cached_api
    _, secret = new_key()
    client = TestClient(app, headers={"Authorization": f"Bearer {secret}"})
    for _ in range(5):
        assert client.get("/v1/fine_tuning/jobs").status_code == 200
    assert len(reads) == 1
    wrong = TestClient(app, headers={"Authorization": "Bearer tq-wrong"})
    for _ in range(2):  # unknown keys are not remembered: each is read, and refused
        assert wrong.get("/v1/fine_tuning/jobs").status_code == 401
    assert len(reads) == 3


def test_revocation_through_this_process_bites_on_the_next_request(cached_api):
    app, _ = cached_api
    _, admin_secret = new_key("ops", admin=True)
    key_id, secret = new_key()
    client = TestClient(app, headers={"Authorization": f"Bearer {secret}"})
    assert client.get("/v1/fine_tuning/jobs").status_code == 200  # now remembered
    admin = TestClient(app, headers={"Authorization": f"Bearer {admin_secret}"})
    assert admin.delete(f"/admin/keys/{key_id}").status_code == 200
    response = client.get("/v1/fine_tuning/jobs")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_a_remembered_key_is_refused_at_its_expiry(cached_api, monkeypatch):
    app, reads = cached_api
    _, secret = new_key(expires_in=60)
    client = TestClient(app, headers={"Authorization": f"Bearer {secret}"})
    assert client.get("/v1/fine_tuning/jobs").status_code == 200
    later = now() + 61
    monkeypatch.setattr("shared.auth.cache.now", lambda: later)
    monkeypatch.setattr("shared.auth.service.now", lambda: later)
    response = client.get("/v1/fine_tuning/jobs")
    assert response.status_code == 401 and response.json()["error"]["code"] == "api_key_expired"
    assert len(reads) == 2  # read again at expiry, and the database said why


def test_a_remembered_key_is_read_again_after_the_ttl(tmp_path, monkeypatch):
    from shared.auth.cache import VerifiedKeys

    keys: VerifiedKeys[str] = VerifiedKeys()
    keys.put("digest", "caller", "key-1", None, seconds=0.05)
    keys.put("other", "caller", "key-2", None, seconds=0)  # 0: not remembered at all
    assert keys.get("digest") == "caller" and keys.get("other") is None
    time.sleep(0.06)
    assert keys.get("digest") is None
