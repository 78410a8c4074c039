"""`tunequeue keys`: create, list and revoke API keys. A secret is printed once, alone on stdout, so that
`KEY=$(tunequeue keys create --tenant acme)` captures exactly the key."""

import sys
from datetime import UTC, datetime

from shared.auth import service
from shared.db import session_scope
from tunequeue.console import require_current_schema, table


def run_keys(args) -> int:
    require_current_schema()
    with session_scope() as session:
        if args.action == "create":
            key, secret = service.create_key(session, args.tenant, admin=args.admin, name=args.name)
            role = "admin" if key.admin else "tenant"
            print(
                f"Created {key.id} ({role} key of tenant {key.tenant!r}); store it now, it is not shown again:",
                file=sys.stderr,
            )
            print(secret)
        elif args.action == "list":
            list_keys(service.list_keys(session, args.tenant), args.tenant)
        else:
            revoke_key(session, args.key_id)
    return 0


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
            f"revoked {timestamp(key.revoked_at)}" if key.revoked_at else "active",
        )
        for key in keys
    ]
    print(table(rows, ("ID", "TENANT", "ROLE", "PREFIX", "NAME", "CREATED (UTC)", "STATE")))


def revoke_key(session, key_id: str) -> None:
    already = service.get_key(session, key_id).revoked_at
    key = service.revoke_key(session, key_id)
    if already:
        print(f"{key.id} (tenant {key.tenant!r}) was already revoked, at {timestamp(already)} UTC")
    else:
        print(f"Revoked {key.id} (tenant {key.tenant!r}); its next request gets 401")


def timestamp(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")
