"""Alembic migrations; run them with `tunequeue db upgrade` (see `shared.migrate`)."""
