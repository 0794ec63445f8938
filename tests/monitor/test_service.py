"""The monitor service against a real nats-server and a real database.

Events in through durable consumers, findings stored in ``monitor_finding`` and published as
``FindingRaised``; deduplication, the outbox after a failed publish, redelivery after a failed
handler, catch-up after a restart without double findings, and the request/reply API.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from choline_core.bus import Bus
from choline_core.embedded import NatsServer
from choline_core.errors import BusError
from choline_core.events import AttemptEnded, Envelope, FindingRaised, Heartbeat
from choline_core.subjects import Subjects
from choline_monitor.handlers import Monitor
from choline_monitor.main import DURABLE_METRICS, MonitorService, MonitorSettings
from choline_monitor.store import MonitorStore
from choline_monitor.watch import RunWatch
from choline_svc.db import make_engine, migrate, schema_name

from .conftest import eventually, running
from .streams import T0, batch, decaying, hb, noisy


async def collect_findings(bus: Bus) -> list[Envelope]:
    got: list[Envelope] = []

    async def on(env: Envelope) -> None:
        got.append(env)

    await bus.subscribe_core(bus.subjects.monitor_findings(), on)
    return got


def hw(store: MonitorStore, run_id: str) -> int:
    stored = store.load_run(run_id)
    return int(stored.state["hw"].get("1", -1)) if stored and stored.state else -1


def _box_time(store: MonitorStore, run_id: str, box_id: str) -> float | None:
    stored = store.load_run(run_id)
    return stored.state["box_t"].get(box_id) if stored and stored.state else None


def store_of(svc: MonitorService) -> MonitorStore:
    assert svc.monitor is not None
    return svc.monitor.store


async def test_a_nan_becomes_one_stored_and_published_finding(
    bus: Bus, subjects: Subjects, monitor_settings: MonitorSettings
) -> None:
    received = await collect_findings(bus)
    async with running(MonitorService(monitor_settings)) as svc:
        store = store_of(svc)
        await bus.publish(subjects.run_metrics("r1"), batch("r1", [2.0, 1.8, 1.6, None]))
        await eventually(lambda: received, what="a FindingRaised event")
        ev = received[0].event(FindingRaised)
        assert ev.run_id == "r1" and ev.detector == "nan" and ev.severity.value == "critical" and ev.step == 4
        assert ev.evidence["last_finite"] == [3, 1.6]
        (row,) = store.findings("r1")
        assert row.id == ev.finding_id == received[0].id and row.published_at is not None

        # the NaN goes on: the same problem, no new finding
        await bus.publish(subjects.run_metrics("r1"), batch("r1", [None] * 20, start=5, seq0=5))
        await eventually(lambda: hw(store, "r1") == 24, what="the second batch")
        await asyncio.sleep(0.3)
        assert len(store.findings("r1")) == 1 and len(received) == 1

        # the request API
        reply = await bus.request(subjects.rpc("monitor", "findings"), Envelope(type="q", data={"run_id": "r1"}))
        (public,) = reply.data["findings"]
        assert public["id"] == row.id and public["published"] is True and public["evidence"]["value"] == "nan"


async def test_heartbeats_and_attempt_ends_with_a_per_run_config(
    bus: Bus, subjects: Subjects, monitor_settings: MonitorSettings
) -> None:
    received = await collect_findings(bus)
    async with running(MonitorService(monitor_settings)) as svc:
        store = store_of(svc)
        bad = await bus.request(
            subjects.rpc("monitor", "configure"), Envelope(type="q", data={"run_id": "r2", "set": ["stall.minn=3"]})
        )
        assert bad.type == "error" and "stall.minn" in bad.data["message"]
        ok = await bus.request(
            subjects.rpc("monitor", "configure"),
            Envelope(
                type="q",
                data={"run_id": "r2", "overrides": {"stall": {"min_seconds": 10, "min_heartbeats": 3, "factor": 0}}},
            ),
        )
        assert ok.type == "monitor.config" and ok.data["config"]["stall"]["min_seconds"] == 10

        t0 = datetime.now(timezone.utc)
        steps = [10, 20, 30] + [30] * 6
        for i, step in enumerate(steps):  # heartbeats 5 s apart (by their envelope time)
            ts = t0 + timedelta(seconds=5 * i)
            env = hb("r2", step, 0.0, seq=i).envelope()
            await bus.publish(subjects.box_heartbeat("b1"), env.model_copy(update={"ts": ts}))
            # the stream keeps the last heartbeat of each box only: let the monitor take each one
            await eventually(lambda ts=ts: _box_time(store, "r2", "b1") == ts.timestamp(), what=f"heartbeat {i}")
        await eventually(lambda: any(f.detector == "stall" for f in store.findings("r2")), what="a stall finding")
        ended = AttemptEnded(
            run_id="r2", attempt=1, reason="exited", exit_code=-9, last_step=30, box_id="b1", traceback_tail=None
        )
        await bus.publish(subjects.run_events("r2"), ended)
        await bus.publish(subjects.run_events("r2"), ended)  # a duplicate with its own message id
        await eventually(lambda: any(f.detector == "crash" for f in store.findings("r2")), what="a crash finding")
        await eventually(lambda: len(received) == 2, what="two events")
        await asyncio.sleep(0.3)
        assert sorted(f.detector for f in store.findings("r2")) == ["crash", "stall"]
        crash = next(f for f in store.findings("r2") if f.detector == "crash")
        assert "SIGKILL" in crash.message and crash.severity == "critical"


@pytest.mark.slow
async def test_a_failed_publish_is_sent_by_the_outbox_sweep_exactly_once(
    bus: Bus, subjects: Subjects, monitor_settings: MonitorSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    received = await collect_findings(bus)
    async with running(MonitorService(monitor_settings)) as svc:
        assert svc.bus is not None
        real_publish = svc.bus.publish
        calls = {"n": 0}

        async def flaky(subject: str, event, **kw):  # type: ignore[no-untyped-def]
            if subject == subjects.monitor_findings():
                calls["n"] += 1
                if calls["n"] == 1:
                    raise BusError("NATS went away for a moment")
            return await real_publish(subject, event, **kw)

        monkeypatch.setattr(svc.bus, "publish", flaky)
        await bus.publish(subjects.run_metrics("r3"), batch("r3", [1.0, None]))
        await eventually(lambda: received, what="the finding, through the sweep")
        await asyncio.sleep(0.8)  # a few more sweeps
        (row,) = store_of(svc).findings("r3")
        assert len(received) == 1 and received[0].id == row.id and row.published_at is not None
        assert calls["n"] == 2


async def test_a_handler_that_dies_after_its_commit_is_redelivered_without_a_double_finding(
    bus: Bus, subjects: Subjects, monitor_settings: MonitorSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    received = await collect_findings(bus)
    async with running(MonitorService(monitor_settings)) as svc:
        monitor = svc.monitor
        assert monitor is not None
        real = Monitor.publish
        died = {"n": 0}

        async def die_once(self, findings):  # type: ignore[no-untyped-def]
            if findings and died["n"] == 0:
                died["n"] += 1
                raise RuntimeError("the process died after its commit, before its ack")
            return await real(self, findings)

        monkeypatch.setattr(Monitor, "publish", die_once)
        await bus.publish(subjects.run_metrics("r4"), batch("r4", [1.0, 2.0, None]))
        await eventually(lambda: received, what="the finding, from the outbox")
        # the message was nacked and redelivered (backoff 1 s); its points were already seen
        consumer = next(c for c in svc.bus._consumers if c.name.endswith(DURABLE_METRICS))  # type: ignore[union-attr]
        await eventually(lambda: consumer.stats.acked >= 1, what="the redelivered message acked")
        assert consumer.stats.errors == 1
        await asyncio.sleep(0.5)
        assert len(store_of(svc).findings("r4")) == 1 and len(received) == 1


def _stream() -> list[float | None]:
    values: list[float | None] = [*decaying(300, 2.3, 0.05, seed=11), *noisy(120, 2.0, seed=12), None, None, None]
    values[120] = 60.0  # a spike
    return values


@pytest.mark.slow
async def test_catch_up_after_a_restart_without_double_findings(
    bus: Bus, subjects: Subjects, monitor_settings: MonitorSettings
) -> None:
    values = _stream()
    batches = [batch("r5", values[i : i + 25], start=i + 1, seq0=i + 1) for i in range(0, len(values), 25)]
    expected = RunWatch("r5").feed_points([p for b in batches for p in b.points], attempt=1)
    assert {f.detector for f in expected} == {"spike", "divergence", "nan"}
    received = await collect_findings(bus)
    half = 10  # batches 0..9: steps 1..250 (the spike)

    async with running(MonitorService(monitor_settings)) as svc:
        store = store_of(svc)
        for b in batches[:half]:
            await bus.publish(subjects.run_metrics("r5"), b)
        await eventually(lambda: hw(store, "r5") == 250, what="the first half")
    assert [f.detector for f in store.findings("r5")] == ["spike"]

    # while the monitor is down: the rest of the run, and three old batches again under new message ids
    for b in batches[half:]:
        await bus.publish(subjects.run_metrics("r5"), b)
    for b in batches[2:5]:
        await bus.publish(subjects.run_metrics("r5"), b.envelope())

    async with running(MonitorService(monitor_settings)) as svc:
        store = store_of(svc)
        await eventually(lambda: hw(store, "r5") == len(values), what="catching up")
        await eventually(lambda: len(received) >= len(expected), what="all findings published")
        await asyncio.sleep(0.5)
        rows = store.findings("r5")
    assert [r.id for r in rows] == [f.id for f in expected]
    assert sorted(e.id for e in received) == sorted(f.id for f in expected)


@pytest.mark.postgres
async def test_findings_on_postgres(pg_url: str, bus: Bus, subjects: Subjects) -> None:
    service = f"tmon{uuid.uuid4().hex[:8]}"
    engine = make_engine(pg_url, service)
    try:
        migrate(engine, "choline_monitor.migrations")
        monitor = Monitor(MonitorStore(engine), bus)
        received = await collect_findings(bus)
        await bus.consume("pg-metrics", subjects.all_run_metrics(), monitor.handle_metrics)
        await bus.publish(subjects.run_metrics("p1"), batch("p1", [1.0, 1.0, None]))
        await bus.publish(subjects.run_metrics("p1"), batch("p1", [None], start=4, seq0=4))
        await eventually(lambda: hw(monitor.store, "p1") == 4, what="both batches")
        await eventually(lambda: received, what="the event")
        (row,) = monitor.store.findings("p1")
        assert row.detector == "nan" and row.published_at is not None and received[0].id == row.id
        # a stale writer changes nothing
        stored = monitor.store.load_run("p1")
        assert stored is not None
        from choline_monitor.store import StaleState

        with pytest.raises(StaleState):
            monitor.store.commit("p1", stored.version - 1, {}, False, [])
        assert monitor.store.load_run("p1").version == stored.version  # type: ignore[union-attr]
    finally:
        engine.dispose()
        from sqlmodel import create_engine

        admin = create_engine(pg_url)
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema_name(service)}" CASCADE'))
        admin.dispose()


async def test_heartbeat_without_a_run_and_garbage_are_dropped(
    bus: Bus, subjects: Subjects, monitor_settings: MonitorSettings, nats_server: NatsServer
) -> None:
    async with running(MonitorService(monitor_settings)) as svc:
        idle = Heartbeat(box_id="b9", agent_version="t", seq=1)
        await bus.publish(subjects.box_heartbeat("b9"), idle)
        await bus.publish(subjects.run_metrics("r9"), Envelope(type="run.metrics", data={"run_id": "r9"}))
        await bus.publish(subjects.run_metrics("r9"), batch("r9", [1.0, None]))
        await eventually(lambda: store_of(svc).findings("r9"), what="the good batch's finding")
        consumer = next(c for c in svc.bus._consumers if c.name.endswith(DURABLE_METRICS))  # type: ignore[union-attr]
        assert consumer.stats.rejected == 1
        assert store_of(svc).load_run("b9") is None
    _ = (T0, nats_server)
