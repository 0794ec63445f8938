"""Alembic migrations of the provisioner service's own tables."""
