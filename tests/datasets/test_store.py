"""The syncer's dataset tables on SQLite and PostgreSQL: idempotent pack indexing, chunks in several packs,
versions (newest first, a re-commit of the newest adds nothing, digest prefixes)."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import create_engine, text

from choline_core.errors import BadSpec, NotFound
from choline_svc.db import make_engine, migrate
from choline_syncer.dataset_store import DatasetStore


def exercise(store: DatasetStore) -> None:
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    p1, p2 = "1" * 64, "2" * 64
    assert store.record_pack(p1, 100, [(a, 0, 10), (b, 10, 20)]) == 2
    assert store.record_pack(p1, 100, [(a, 0, 10), (b, 10, 20)]) == 0  # again: nothing new
    assert store.record_pack(p2, 50, [(b, 0, 20), (c, 20, 5)]) == 1  # b was indexed already
    assert store.lookup([a, c, "d" * 64]) == {a: (p1, 0, 10), c: (p2, 20, 5)}
    assert store.places([b]) == {(b, p1, 10, 20), (b, p2, 0, 20)}
    assert store.known_packs([p1, p2, "3" * 64]) == {p1, p2}
    store.forget_pack(p2)
    assert store.lookup([c]) == {} and store.known_packs([p2]) == set()
    m1, m2 = "e" * 64, "ef" + "0" * 62
    kw = {"size": 1, "files": 1, "chunks": 1, "packs": [p1], "source": None}
    v1 = store.add_version(owner="ann", name="ds", manifest=m1, **kw)  # type: ignore[arg-type]
    assert store.add_version(owner="ann", name="ds", manifest=m1, **kw).id == v1.id  # type: ignore[arg-type]
    v2 = store.add_version(owner="ann", name="ds", manifest=m2, **kw)  # type: ignore[arg-type]
    store.add_version(owner="bob", name="ds", manifest=m1, **kw)  # type: ignore[arg-type]
    assert [v.manifest for v in store.versions("ann", "ds")] == [m2, m1]
    assert store.find("ann", "ds", None).id == v2.id
    assert store.find("ann", "ds", "ee").id == v1.id
    with pytest.raises(BadSpec, match="matches 2 versions"):
        store.find("ann", "ds", "e")
    with pytest.raises(NotFound):
        store.find("ann", "other", None)
    assert len(store.versions(None, "ds")) == 3 and store.by_manifest(m2) is not None


def test_dataset_tables_on_sqlite(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url, "syncer")
    migrate(engine, "choline_syncer.migrations")
    exercise(DatasetStore(engine))
    engine.dispose()


@pytest.mark.postgres
def test_dataset_tables_on_postgres(pg_url: str) -> None:
    service = f"syncer_{uuid.uuid4().hex[:8]}"
    engine = make_engine(pg_url, service)
    try:
        migrate(engine, "choline_syncer.migrations")
        exercise(DatasetStore(engine))
    finally:
        engine.dispose()
        admin = create_engine(pg_url)
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "choline_{service}" CASCADE'))
        admin.dispose()
