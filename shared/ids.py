"""Public identifiers in OpenAI's style: a prefix and 24 hex digits. The first 12 are the creation time in
milliseconds, so that ids sort in creation order (pagination ties on a shared second stay in order)."""

import secrets
import time


def new_id(prefix: str) -> str:
    return f"{prefix}-{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


def now() -> int:
    """Unix seconds: what OpenAI's API returns for every timestamp."""
    return int(time.time())
