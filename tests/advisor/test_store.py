"""The advice and action tables (migration ``monitor_0003``) on SQLite and PostgreSQL: one row per
finding, guarded leases and outcomes, counts for the rate limits, one action per finding, the policy."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import text

from choline_core.advice import AdviceAnswer
from choline_monitor.advice_store import ActionRow, AdviceRow, AdviceStore, action_id, advice_id, since
from choline_monitor.models import utcnow
from choline_monitor.store import MonitorStore
from choline_svc.db import make_engine, migrate, schema_name


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def stores(request: pytest.FixtureRequest, sqlite_url: str) -> Iterator[tuple[AdviceStore, MonitorStore]]:
    service = f"tadv{uuid.uuid4().hex[:8]}"
    url = sqlite_url if request.param == "sqlite" else request.getfixturevalue("pg_url")
    engine = make_engine(url, service)
    migrate(engine, "choline_monitor.migrations")
    try:
        yield AdviceStore(engine), MonitorStore(engine)
    finally:
        engine.dispose()
        if request.param == "postgres":
            from sqlmodel import create_engine

            admin = create_engine(url)
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema_name(service)}" CASCADE'))
            admin.dispose()


def row(run_id: str, finding: str | None, trigger: str = "finding", status: str = "pending") -> AdviceRow:
    aid = advice_id(finding) if finding else uuid.uuid4().hex
    return AdviceRow(id=aid, run_id=run_id, finding_id=finding, trigger=trigger, status=status, created_at=utcnow())


def test_advice_rows_leases_and_outcomes(stores: tuple[AdviceStore, MonitorStore]) -> None:
    store, _ = stores
    first = row("r1", "f" * 32)
    assert store.add(first) and not store.add(row("r1", "f" * 32))  # one per finding
    assert store.claimable(utcnow()) == [first.id]
    claimed = store.claim(first.id, lease_s=60)
    assert claimed is not None and claimed.tries == 1
    assert store.claim(first.id, lease_s=60) is None  # held
    assert store.claimable(utcnow()) == [] and store.claimable(utcnow() + timedelta(seconds=61)) == [first.id]
    answer = AdviceAnswer(diagnosis="diverged", confidence=0.7, recommended_action="pause")
    done = store.finish(first.id, status="answered", source="llm", answer=answer, error=None, model="m", latency_s=1.5)
    assert done and not store.finish(
        first.id, status="degraded", source="detector", answer=None, error="late", model=None, latency_s=9.0
    )  # a late second worker changes nothing
    public = store.of_run("r1")[0].public()
    assert public.status == "answered" and public.answer == answer and public.latency_s == 1.5
    assert public.context is None and store.for_findings(["f" * 32])["f" * 32].id == first.id
    # counts for the rate limits: automatic and on-demand apart, rate-limited rows not counted
    store.add(row("r1", None, trigger="on_demand"))
    store.add(row("r1", "e" * 32, status="rate_limited"))
    assert store.count_since("r1", since(1), on_demand=False) == 1
    assert store.count_since("r1", since(1), on_demand=True) == 1
    assert store.count_since("r1", utcnow() + timedelta(seconds=5), on_demand=False) == 0


def test_actions_and_the_policy(stores: tuple[AdviceStore, MonitorStore]) -> None:
    store, monitor_store = stores
    aid = action_id("f" * 32, "pause")
    new = ActionRow(id=aid, run_id="r2", finding_id="f" * 32, action="pause", status="pending", created_at=utcnow())
    assert store.begin_action(new).status == "pending"
    store.finish_action(aid, "sent", "paused")
    again = ActionRow(id=aid, run_id="r2", finding_id="f" * 32, action="pause", status="pending", created_at=utcnow())
    assert store.begin_action(again).status == "sent"  # the stored one, not a second
    assert [a.status for a in store.actions("r2")] == ["sent"]
    # the policy lives on the run's row without disturbing the watch's guarded version
    assert store.policy("r2") is None
    store.set_policy("r2", "auto-pause")
    stored = monitor_store.load_run("r2")
    assert store.policy("r2") == "auto-pause" and stored is not None
    monitor_store.commit("r2", stored.version, {"v": 1}, False, [])
    store.set_policy("r2", "notify")
    assert store.policy("r2") == "notify" and monitor_store.load_run("r2").version == stored.version + 1  # type: ignore[union-attr]
