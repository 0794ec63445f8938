"""Alembic migrations of the deploy service's own tables."""
