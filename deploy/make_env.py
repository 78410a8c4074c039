"""Writes the `.env` file that docker-compose.yml reads: a random credential for every service, and the key that
encrypts webhook secrets at rest. `make env` runs it.

It never overwrites: the credentials are baked into the volumes on the first `docker compose up` (Postgres and
MinIO keep the passwords they were initialised with), and losing TUNEQUEUE_SECRET_KEYS makes every stored
webhook secret unreadable. The file is created with mode 0600 in one step, so no other user can read it even for
a moment. Standard library only: it runs before any virtual environment exists.

    python3 deploy/make_env.py [PATH]        # default: .env beside docker-compose.yml
"""

import base64
import os
import secrets
import string
import sys
from pathlib import Path

DEFAULT_PATH = Path(__file__).resolve().parent.parent / ".env"
ALPHANUMERIC = string.ascii_letters + string.digits


def token(length: int = 40) -> str:
    """Letters and digits only (about 5.95 bits each; 40 make 238 bits): a value that may sit unescaped in a
    database or broker URL, and never starts with `-`, so that `redis-server` and `mc` never take it for an
    option."""
    return "".join(secrets.choice(ALPHANUMERIC) for _ in range(length))


def fernet_key() -> str:
    """A Fernet key is 32 random bytes in URL-safe base64 (what `Fernet.generate_key()` returns)."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def credentials() -> dict[str, str]:
    return {
        "POSTGRES_PASSWORD": token(),
        "REDIS_PASSWORD": token(),
        "MINIO_ROOT_USER": f"root{token(12)}",
        "MINIO_ROOT_PASSWORD": token(),
        "MINIO_APP_ACCESS_KEY": f"app{token(12)}",
        "MINIO_APP_SECRET_KEY": token(),
        "TUNEQUEUE_SECRET_KEYS": fernet_key(),
    }


def render(values: dict[str, str]) -> str:
    lines = [
        "# Written by `make env` (deploy/make_env.py); every variable is described in deploy/env.example.",
        "# Keep this file secret and back it up: Postgres and MinIO keep the passwords they were first started",
        "# with, and webhook secrets cannot be decrypted without TUNEQUEUE_SECRET_KEYS.",
        *(f"{name}={value}" for name, value in values.items()),
        "",
        "# The API is published on 127.0.0.1 only; put a TLS proxy in front of it (docs/security.md).",
        "# TUNEQUEUE_API_BIND=127.0.0.1",
        "# TUNEQUEUE_API_PORT=8000",
    ]
    return "\n".join(lines) + "\n"


def write_new(path: Path, text: str) -> bool:
    """Creates `path` readable by its owner only; False (and nothing written) if it already exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return True


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else DEFAULT_PATH
    values = credentials()
    if not write_new(path, render(values)):
        print(f"{path} exists; left unchanged. Delete it only together with the volumes whose passwords it holds.")
        return 0
    print(f"wrote {path} (mode 0600): {', '.join(values)}. Back it up; it is not shown again.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
