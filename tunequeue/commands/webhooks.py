"""`tunequeue webhooks`: the keys that encrypt webhook signing secrets at rest. `new-key` prints a key for
TUNEQUEUE_SECRET_KEYS, alone on stdout; `reencrypt` rewrites every stored secret with the first key, the step of
a rotation after which older keys can be removed from the list."""

import sys

from shared import secrets
from shared.db import session_scope
from shared.webhooks import service
from tunequeue.console import Refused, require_current_schema


def run_webhooks(args) -> int:
    if args.action == "new-key":
        advice = "Put it first in TUNEQUEUE_SECRET_KEYS on every node, then run `tunequeue webhooks reencrypt`:"
        print(advice, file=sys.stderr)
        print(secrets.new_key())
        return 0
    require_current_schema()
    try:
        with session_scope() as session:
            count = service.reencrypt_secrets(session)
    except secrets.SecretUnreadable as exc:
        raise Refused(f"nothing was rewritten: {exc}") from None
    print(f"Re-encrypted {count} webhook secret{'' if count == 1 else 's'} with the current (first) key")
    return 0
