"""Webhook signing secrets are stored encrypted (Fernet): the database never holds one in plain text, receivers
still verify signatures with the secret shown at creation, keys rotate (`tunequeue webhooks reencrypt`), and
secrets stored in plain text before encryption at rest still sign."""

import logging
import stat

import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import text

from tests.support import embedded_in_process, make_key
from tests.webhook_receivers import LoopbackReceiver, add_delivery, add_endpoint, delivery_row

SDK = OpenAI(api_key="unused", base_url="http://127.0.0.1:1/v1")  # only its webhook helpers are used


@pytest.fixture
def receiver(tmp_path, monkeypatch):
    embedded_in_process(monkeypatch, tmp_path / "data", webhook_allowed_networks="127.0.0.0/8")
    receiver = LoopbackReceiver()
    yield receiver
    receiver.close()


def use_keys(monkeypatch, keys: str) -> None:
    from shared.settings import get_settings

    monkeypatch.setenv("TUNEQUEUE_SECRET_KEYS", keys)
    get_settings.cache_clear()


def stored_secret(endpoint_id: str) -> str:
    from shared.db import session_scope

    with session_scope() as session:
        query = text("SELECT secret FROM webhook_endpoints WHERE id = :id")
        return session.execute(query, {"id": endpoint_id}).scalar_one()


def deliver_and_verify(receiver: LoopbackReceiver, endpoint_id: str, secret: str) -> None:
    """One delivery to the endpoint, whose signature the official SDK verifies with `secret`."""
    from shared.webhooks.service import attempt_delivery

    delivery = add_delivery(endpoint_id)
    assert attempt_delivery(delivery)[0] == "delivered", delivery_row(delivery)
    headers, body, _ = receiver.received[-1]
    SDK.webhooks.verify_signature(body, headers, secret=secret)


def test_the_database_holds_no_plaintext_secret_and_receivers_verify(receiver, tmp_path):
    from api.app import create_app

    with TestClient(create_app(), headers={"Authorization": f"Bearer {make_key('tenant-a')}"}) as client:
        created = client.post("/v1/webhooks", json={"url": receiver.url}).json()
        secret = created["secret"]
        assert secret.startswith("whsec_") and secret not in client.get(f"/v1/webhooks/{created['id']}").text
    stored = stored_secret(created["id"])
    assert secret not in stored and secret.removeprefix("whsec_") not in stored and not stored.startswith("whsec_")
    key_file = tmp_path / "data" / "secret.key"  # no keys set: one generated, readable by its owner only
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    deliver_and_verify(receiver, created["id"], secret)


def test_keys_rotate_and_reencrypt_moves_every_secret_to_the_first_key(receiver, monkeypatch, capsys):
    from shared import secrets
    from tunequeue.cli import main

    old, new = secrets.new_key(), secrets.new_key()
    use_keys(monkeypatch, old)
    plain = "whsec_" + "B" * 43 + "="
    endpoint = add_endpoint("tenant-a", receiver.url, secret=plain)
    legacy = add_endpoint("tenant-a", receiver.url)
    from shared.db import session_scope

    with session_scope() as session:  # written before encryption at rest: the plain secret itself
        session.execute(text("UPDATE webhook_endpoints SET secret = :s WHERE id = :id"), {"s": plain, "id": legacy})
    deliver_and_verify(receiver, legacy, plain)  # legacy plaintext still signs

    use_keys(monkeypatch, f"{new},{old}")  # the new key first: it encrypts, both decrypt
    deliver_and_verify(receiver, endpoint, plain)
    assert main(["webhooks", "reencrypt"]) == 0
    assert "Re-encrypted 2 webhook secrets" in capsys.readouterr().out
    assert not stored_secret(legacy).startswith("whsec_")

    use_keys(monkeypatch, new)  # the old key dropped: every secret was rewritten with the new one
    deliver_and_verify(receiver, endpoint, plain)
    deliver_and_verify(receiver, legacy, plain)
    use_keys(monkeypatch, old)  # and the old key alone no longer reads them
    with pytest.raises(secrets.SecretUnreadable, match="TUNEQUEUE_SECRET_KEYS"):
        secrets.decrypt(stored_secret(endpoint))
    assert main(["webhooks", "reencrypt"]) == 1
    assert "nothing was rewritten" in capsys.readouterr().err


def test_a_generated_key_is_warned_about_once_when_the_database_is_shared(receiver, monkeypatch, tmp_path, caplog):
    from shared import secrets
    from shared.settings import get_settings

    monkeypatch.setenv("TUNEQUEUE_DATABASE_URL", f"sqlite:///{tmp_path / 'data' / 'tunequeue.db'}")
    get_settings.cache_clear()
    with caplog.at_level(logging.WARNING, logger="tunequeue.secrets"):
        assert secrets.decrypt(secrets.encrypt("whsec_x")) == "whsec_x"
        secrets.encrypt("again")
    warnings = [r.getMessage() for r in caplog.records if r.name == "tunequeue.secrets"]
    assert len(warnings) == 1 and "set TUNEQUEUE_SECRET_KEYS" in warnings[0], warnings


def test_a_malformed_key_setting_names_itself(receiver, monkeypatch):
    from shared import secrets

    use_keys(monkeypatch, "not-a-fernet-key")
    with pytest.raises(ValueError, match="TUNEQUEUE_SECRET_KEYS"):
        secrets.encrypt("whsec_x")
