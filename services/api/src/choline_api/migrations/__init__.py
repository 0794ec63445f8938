"""Alembic migrations of the api service's own tables."""
