"""Alembic migrations of the monitor service's own tables."""
