"""`tunequeue db`: the schema, through Alembic, reported in one line per command."""

from shared import migrate
from tunequeue.console import schema_state


def run_db(args) -> int:
    where = migrate.describe_database()
    before = schema_state()
    if args.action == "current":
        if before.current is None:
            print(f"{where}: no tunequeue schema; the newest is {before.head} (run `tunequeue db upgrade`)")
        elif before.is_current:
            print(f"{where}: at {before.current} (the newest)")
        else:
            print(f"{where}: at {before.current}; the newest is {before.head} (run `tunequeue db upgrade`)")
        return 0
    if args.action == "upgrade":
        migrate.upgrade(args.revision)
    else:
        migrate.downgrade(args.revision)
    after = schema_state()
    if after.current == before.current:
        print(f"{where}: already at {after.current or 'base (empty)'}")
    else:
        print(f"{where}: migrated from {before.current or 'base (empty)'} to {after.current or 'base (empty)'}")
    return 0
