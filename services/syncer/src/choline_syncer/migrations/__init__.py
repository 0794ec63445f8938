"""Alembic migrations of the syncer service's own tables."""
