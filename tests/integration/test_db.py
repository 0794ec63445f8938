"""Database on SQLite and PostgreSQL: engines, per-service isolation, migrations from empty."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, SQLModel, select

from choline_core.settings import CholineSettings
from choline_svc.db import current_revision, database_url, make_engine, migrate, schema_name, session

SERVICES = ["api", "provisioner", "syncer", "monitor", "deploy"]


class Widget(SQLModel, table=True):
    __tablename__ = "widget"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True)
    version: int = 1
    color: str | None = None


def exercise(url: str, service: str) -> None:
    engine = make_engine(url, service)
    migrate(engine, "tests.fixtures.demo_migrations")
    assert current_revision(engine) == "demo_0002"
    migrate(engine, "tests.fixtures.demo_migrations")  # idempotent
    with session(engine) as s:
        s.add(Widget(name="a", color="red"))
    with session(engine) as s:
        assert s.exec(select(Widget)).one().color == "red"
    # a guarded update changes nothing when the version is stale
    with session(engine) as s:
        res = s.execute(text("UPDATE widget SET color='blue', version=version+1 WHERE name='a' AND version=99"))
        assert res.rowcount == 0  # type: ignore[attr-defined]
    with pytest.raises(IntegrityError), session(engine) as s:
        s.add(Widget(name="a"))
    engine.dispose()


def test_sqlite_default_location_and_wal(choline_home) -> None:  # type: ignore[no-untyped-def]
    url = database_url(CholineSettings(), "provisioner")
    assert url == f"sqlite:///{choline_home / 'db' / 'provisioner.sqlite'}"
    engine = make_engine(url, "provisioner")
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    engine.dispose()


def test_sqlite_migrations_and_guards(sqlite_url: str) -> None:
    exercise(sqlite_url, "demo")


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_migrates_from_empty_on_sqlite(tmp_path, service: str) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / service}.sqlite", service)
    migrate(engine, f"choline_{service}.migrations")
    assert current_revision(engine) is not None
    engine.dispose()


@pytest.mark.postgres
def test_postgres_migrations_and_guards(pg_url: str) -> None:
    service = f"t{uuid.uuid4().hex[:8]}"
    try:
        exercise(pg_url, service)
    finally:
        drop_schema(pg_url, service)


@pytest.mark.postgres
def test_postgres_services_are_isolated_by_schema(pg_url: str) -> None:
    a, b = f"ta{uuid.uuid4().hex[:8]}", f"tb{uuid.uuid4().hex[:8]}"
    try:
        ea, eb = make_engine(pg_url, a), make_engine(pg_url, b)
        migrate(ea, "tests.fixtures.demo_migrations")
        with session(ea) as s:
            s.add(Widget(name="only-in-a"))
        migrate(eb, "tests.fixtures.demo_migrations")
        with session(eb) as s:
            assert s.exec(select(Widget)).all() == []
        ea.dispose()
        eb.dispose()
    finally:
        drop_schema(pg_url, a)
        drop_schema(pg_url, b)


@pytest.mark.postgres
@pytest.mark.parametrize("service", SERVICES)
def test_every_service_migrates_from_empty_on_postgres(pg_url: str, service: str) -> None:
    name = f"t{uuid.uuid4().hex[:6]}{service}"
    try:
        engine = make_engine(pg_url, name)
        migrate(engine, f"choline_{service}.migrations")
        assert current_revision(engine) is not None
        engine.dispose()
    finally:
        drop_schema(pg_url, name)


def drop_schema(url: str, service: str) -> None:
    from sqlmodel import create_engine

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema_name(service)}" CASCADE'))
    engine.dispose()
