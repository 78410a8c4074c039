"""Secrets kept at rest in the database (webhook signing secrets), encrypted with Fernet (AES-128-CBC + HMAC).

Keys come from `TUNEQUEUE_SECRET_KEYS` (comma-separated): the first encrypts, every one decrypts, so a key is
rotated by putting the new one first, running `tunequeue webhooks reencrypt`, then dropping the old one. With
none set, a key is generated once into `data_dir/secret.key` (mode 0600): enough for one machine, but every
API and worker node must decrypt what the others wrote, so a deployment with several nodes sets the keys.

A stored value that starts with `whsec_` is a secret written before encryption at rest, still read as is."""

import functools
import logging
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from shared.settings import get_settings

log = logging.getLogger("tunequeue.secrets")
LEGACY_PLAINTEXT = "whsec_"
KEY_FILE = "secret.key"


class SecretUnreadable(Exception):
    """A stored secret that none of the configured keys decrypts: the keys changed without a re-encryption."""


def new_key() -> str:
    return Fernet.generate_key().decode()


def encrypt(plaintext: str) -> str:
    return _keys().encrypt(plaintext.encode()).decode()


def decrypt(stored: str) -> str:
    if stored.startswith(LEGACY_PLAINTEXT):
        return stored
    try:
        return _keys().decrypt(stored.encode()).decode()
    except InvalidToken:
        raise SecretUnreadable(
            "a stored secret is not decrypted by any key in TUNEQUEUE_SECRET_KEYS (or data_dir/secret.key): "
            "add the key it was written with back to the list"
        ) from None


def reencrypt(stored: str) -> str:
    """The same secret encrypted with the first key: how a rotation reaches the rows already stored."""
    return encrypt(decrypt(stored))


def _keys() -> MultiFernet:
    settings = get_settings()
    return _multifernet(settings.secret_keys, str(settings.resolved_data_dir), settings.embedded)


@functools.lru_cache(maxsize=8)
def _multifernet(secret_keys: str, data_dir: str, embedded: bool) -> MultiFernet:
    keys = [key.strip() for key in secret_keys.split(",") if key.strip()]
    if not keys:
        keys = [_generated_key(Path(data_dir))]
        if not embedded:
            log.warning(
                "TUNEQUEUE_SECRET_KEYS is not set: webhook secrets are encrypted with a key generated in %s. Every "
                "API and worker node must use the same key: set TUNEQUEUE_SECRET_KEYS on all of them "
                "(`tunequeue webhooks new-key` prints one)",
                Path(data_dir) / KEY_FILE,
            )
    try:
        return MultiFernet([Fernet(key) for key in keys])
    except ValueError:
        raise ValueError(
            "TUNEQUEUE_SECRET_KEYS must be comma-separated Fernet keys (32 url-safe base64-encoded bytes each); "
            "`tunequeue webhooks new-key` prints one"
        ) from None


def _generated_key(data_dir: Path) -> str:
    """The key in data_dir/secret.key, written on first use. Written aside and linked into place, so a process
    starting at the same moment (the API and a worker) reads either no file or the whole key, never half."""
    path = data_dir / KEY_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        draft = data_dir / f".{KEY_FILE}.{os.getpid()}"
        descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as stream:
            stream.write(new_key())
        try:
            os.link(draft, path)
        except FileExistsError:  # another process was first: its key is the one
            pass
        finally:
            draft.unlink()
    return path.read_text().strip()


def derived_token(purpose: str) -> str:
    """A shared secret for one purpose (the API's calls to inference workers), derived from the first key: every
    node that can read the others' secrets computes the same token, and nothing else needs distributing."""
    import hashlib
    import hmac

    settings = get_settings()
    first = _multifernet(settings.secret_keys, str(settings.resolved_data_dir), settings.embedded)._fernets[0]
    return hmac.new(first._signing_key, purpose.encode(), hashlib.sha256).hexdigest()
