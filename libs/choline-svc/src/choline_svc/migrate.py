"""Alembic's ``env.py`` body, shared by every service's migrations package.

A service's ``migrations/env.py`` is two lines::

    from choline_svc.migrate import run_env
    run_env()
"""

from __future__ import annotations

from alembic import context


def run_env() -> None:
    cfg = context.config
    connection = cfg.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run migrations through choline_svc.db.migrate(), not the alembic CLI")
    context.configure(connection=connection, target_metadata=None, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
