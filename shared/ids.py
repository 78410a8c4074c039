"""Public identifiers in OpenAI's style: a prefix and 24 random hex digits."""

import secrets
import time


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    """Unix seconds: what OpenAI's API returns for every timestamp."""
    return int(time.time())
