"""The database: SQLModel on SQLite (default) or PostgreSQL (``CHOLINE_DATABASE_URL``).

Each service owns its tables. In the embedded default each service has its own SQLite file
``$CHOLINE_HOME/db/<service>.sqlite`` (WAL mode, so readers never block the writer and two
processes never contend on one file); on PostgreSQL each service gets its own schema
``choline_<service>`` in the one database, selected through ``search_path``.

Migrations are Alembic from day one: every service ships a ``migrations`` package
(``env.py`` calling ``choline_svc.migrate.run_env()``, and ``versions/``), and
``migrate(engine, "choline_<service>.migrations")`` brings the schema to head.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Session, create_engine

from choline_core.errors import InfraError
from choline_core.settings import CholineSettings


def database_url(settings: CholineSettings, service: str) -> str:
    """``CHOLINE_DATABASE_URL`` if set, else this service's SQLite file under CHOLINE_HOME."""
    url = settings.secret("database_url")
    if url:
        return url
    path = settings.path("db", f"{service}.sqlite")
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def schema_name(service: str) -> str:
    return f"choline_{service}"


def make_engine(url: str, service: str, *, echo: bool = False) -> Engine:
    """An engine for ``service``: SQLite in WAL mode, or PostgreSQL in the service's own schema."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        engine = create_engine(url, echo=echo, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    if backend in ("postgresql", "postgres"):
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        schema = schema_name(service)
        bootstrap = create_engine(parsed, echo=echo)
        try:
            with bootstrap.begin() as conn:
                conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        except Exception as exc:
            raise InfraError(
                f"cannot reach PostgreSQL at {parsed.render_as_string(hide_password=True)}: {exc}"
            ) from exc
        finally:
            bootstrap.dispose()
        return create_engine(parsed, echo=echo, pool_pre_ping=True, connect_args={"options": f"-csearch_path={schema}"})
    raise InfraError(f"unsupported database {backend!r}: use sqlite:///path or postgresql://...")


@contextlib.contextmanager
def session(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(engine, expire_on_commit=False) as s:
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise


def migrations_dir(package: str) -> Path:
    mod = importlib.import_module(package)
    if not mod.__file__:
        raise InfraError(f"migrations package {package} has no location")
    return Path(mod.__file__).parent


def migrate(engine: Engine, package: str, revision: str = "head") -> None:
    """Upgrade the schema to ``revision`` with the migrations in ``package``."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir(package)))
    cfg.attributes["engine"] = engine
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
