"""`tunequeue keys`: create, list and revoke API keys. A secret is printed once, alone on stdout, so that
`KEY=$(tunequeue keys create --tenant acme)` captures exactly the key."""

import re
import sys
from datetime import UTC, datetime

from shared.auth import service
from shared.db import session_scope
from shared.ids import now
from tunequeue.console import Refused, require_current_schema, table

DURATION = re.compile(r"^(\d{1,10})([dhm]?)$")
UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "": 1}


def run_keys(args) -> int:
    require_current_schema()
    with session_scope() as session:
        if args.action == "create":
            expires_in = parse_duration(args.expires_in) if getattr(args, "expires_in", None) else None
            key, secret = service.create_key(
                session, args.tenant, admin=args.admin, name=args.name, expires_in=expires_in
            )
            role = "admin" if key.admin else "tenant"
            until = f", expires {timestamp(key.expires_at)} UTC" if key.expires_at else ""
            print(
                f"Created {key.id} ({role} key of tenant {key.tenant!r}{until}); store it now, it is not shown again:",
                file=sys.stderr,
            )
            print(secret)
        elif args.action == "list":
            list_keys(service.list_keys(session, args.tenant), args.tenant)
        else:
            revoke_key(session, args.key_id)
    return 0


def parse_duration(text: str) -> int:
    """`--expires-in`: 30d, 12h, 90m, or plain seconds."""
    match = DURATION.match(text.strip())
    if not match or int(match[1]) == 0:
        raise Refused(f"--expires-in {text!r}: give a positive duration such as 30d, 12h, 90m or 3600 (seconds)")
    return int(match[1]) * UNIT_SECONDS[match[2]]


def list_keys(keys, tenant: str | None) -> None:
    if not keys:
        where = f" for tenant {tenant!r}" if tenant else ""
        print(f"No API keys{where}. Create one with `tunequeue keys create --tenant NAME`.")
        return
    rows = [
        (
            key.id,
            key.tenant,
            "admin" if key.admin else "tenant",
            f"{key.prefix}…",
            key.name or "",
            timestamp(key.created_at),
            timestamp(key.expires_at) if key.expires_at else "never",
            state(key),
        )
        for key in keys
    ]
    print(table(rows, ("ID", "TENANT", "ROLE", "PREFIX", "NAME", "CREATED (UTC)", "EXPIRES (UTC)", "STATE")))


def state(key) -> str:
    if key.revoked_at:
        return f"revoked {timestamp(key.revoked_at)}"
    return "expired" if service.is_expired(key, now()) else "active"


def revoke_key(session, key_id: str) -> None:
    already = service.get_key(session, key_id).revoked_at
    key = service.revoke_key(session, key_id)
    if already:
        print(f"{key.id} (tenant {key.tenant!r}) was already revoked, at {timestamp(already)} UTC")
    else:
        print(f"Revoked {key.id} (tenant {key.tenant!r}); its next request gets 401")


def timestamp(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")
