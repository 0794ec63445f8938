"""Metric rollups and chart series (``choline_api.metrics``) against brute force over the raw
points: after batches with duplicates, after an attempt supersedes part of the history, with old
points arriving late, on SQLite and PostgreSQL; series keep spikes and stay within max_points."""

from __future__ import annotations

import bisect
import math
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from choline_api.metrics import RESOLUTIONS, MetricStore
from choline_svc.db import make_engine, migrate, schema_name

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


@dataclass
class P:
    seq: int
    step: int
    key: str
    value: float | None
    raw: str | None = None
    ts: datetime = T0
    epoch: int | None = None


def migrated(url: str, service: str = "api") -> Engine:
    engine = make_engine(url, service)
    migrate(engine, "choline_api.migrations")
    return engine


@pytest.fixture
def metrics(sqlite_url: str) -> Iterator[MetricStore]:
    engine = migrated(sqlite_url)
    yield MetricStore(engine)
    engine.dispose()


def raw_points(m: MetricStore, run_id: str) -> list[tuple[str, int, int, int, float | None, bool]]:
    with m.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT key, step, attempt, seq, value, superseded FROM api_metric_point WHERE run_id = :r"),
            {"r": run_id},
        ).all()
    return [(r[0], r[1], r[2], r[3], r[4], bool(r[5])) for r in rows]


def brute_rollups(m: MetricStore, run_id: str) -> dict[tuple[str, int, int], tuple[Any, ...]]:
    """What the rollups must hold, computed from scratch from the non-superseded raw points."""
    out: dict[tuple[str, int, int], list[Any]] = {}
    for key, step, attempt, seq, value, sup in raw_points(m, run_id):
        if sup:
            continue
        for res in RESOLUTIONS:
            k = (key, res, step // res)
            a = out.setdefault(k, [0, 0, None, None, step, (step, attempt, seq), value])
            a[0] += 1
            if value is None:
                a[1] += 1
            else:
                a[2] = value if a[2] is None else min(a[2], value)
                a[3] = value if a[3] is None else max(a[3], value)
            a[4] = min(a[4], step)
            if (step, attempt, seq) > a[5]:
                a[5], a[6] = (step, attempt, seq), value
    return {k: (a[0], a[1], a[2], a[3], a[4], a[5][0], a[6]) for k, a in out.items()}


def stored_rollups(m: MetricStore, run_id: str) -> dict[tuple[str, int, int], tuple[Any, ...]]:
    with m.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT key, res, bucket, n, nonfinite, vmin, vmax, first_step, last_step, last_value "
                "FROM api_metric_rollup WHERE run_id = :r"
            ),
            {"r": run_id},
        ).all()
    return {(r[0], r[1], r[2]): tuple(r[3:]) for r in rows}


def batch(attempt_seq0: int, steps: list[int], key: str = "loss", rng: random.Random | None = None) -> list[P]:
    rng = rng or random.Random(0)
    return [P(seq=attempt_seq0 + i, step=s, key=key, value=rng.gauss(1.0, 0.1)) for i, s in enumerate(steps)]


def test_rollups_match_brute_force_under_duplicates_nonfinite_and_many_keys(metrics: MetricStore) -> None:
    rng = random.Random(7)
    run = "rroll1"
    pts = []
    for i in range(6000):
        step = i // 2  # two keys per step
        key = "loss" if i % 2 == 0 else "acc"
        value: float | None = rng.gauss(0, 1)
        if i == 3001:
            value = float("nan")
        if i == 4001:
            value = float("inf")
        pts.append(P(seq=i, step=step, key=key, value=value))
    # in batches, some replayed (same keys, other values: the first write wins), one batch twice
    chunks = [pts[i : i + 700] for i in range(0, len(pts), 700)]
    result = metrics.ingest([("rroll1", 1, c) for c in chunks[:4]])
    assert result.stored == 2800
    replay = [P(p.seq, p.step, p.key, 99.0) for p in chunks[2]]
    result = metrics.ingest([("rroll1", 1, replay), ("rroll1", 1, chunks[4]), ("rroll1", 1, chunks[4])])
    assert result.stored == 700
    metrics.ingest([("rroll1", 1, c) for c in chunks[4:]])
    assert len(raw_points(metrics, run)) == 6000
    assert 99.0 not in [p[4] for p in raw_points(metrics, run)]
    assert stored_rollups(metrics, run) == brute_rollups(metrics, run)
    coarse = stored_rollups(metrics, run)[("acc", 65536, 0)]
    assert coarse[0] == 3000 and coarse[1] == 2  # n, nonfinite (nan and inf kept as raw)
    assert metrics.keys(run) == ["acc", "loss"]


def test_an_attempt_supersedes_history_and_the_rebuild_is_exact(metrics: MetricStore) -> None:
    run = "rroll2"
    rng = random.Random(1)
    metrics.ingest([(run, 1, batch(0, list(range(5000)), rng=rng))])
    metrics.ingest([(run, 1, batch(0, list(range(3000)), key="acc", rng=rng))])
    # attempt 2 resumes from step 4000: attempt 1's steps 4001.. are superseded
    marked = metrics.attempt_started(run, 2, 4000, "box2", T0)
    assert marked == 999
    assert metrics.attempt_started(run, 2, 4000, "box2", T0) == 0  # idempotent
    metrics.ingest([(run, 2, batch(0, list(range(4001, 6000)), rng=rng))])
    assert stored_rollups(metrics, run) == brute_rollups(metrics, run)
    # attempt 3 resumes from an older checkpoint (step 1000) before attempt 2's points all arrived
    metrics.attempt_started(run, 3, 1000, "box3", T0)
    late_from_2 = batch(5000, list(range(6000, 6100)), rng=rng)  # attempt 2 beyond 1000: superseded on arrival
    late_from_1 = [P(seq=99999, step=500, key="loss", value=-50.0)]  # attempt 1 before 1000: still the run's
    result = metrics.ingest([(run, 2, late_from_2), (run, 1, late_from_1)])
    assert result.superseded == 100 and result.stored == 101
    metrics.ingest([(run, 3, batch(0, list(range(1001, 1500)), rng=rng))])
    assert stored_rollups(metrics, run) == brute_rollups(metrics, run)
    visible = [(k, s, a) for k, s, a, _, _, sup in raw_points(metrics, run) if not sup and k == "loss"]
    assert max(s for _, s, a in visible if a == 1) <= 1000
    assert all(a == 3 for _, s, a in visible if s > 1000)
    series = metrics.series(run, "loss", max_points=100000)
    assert series.resolution == 1 and series.step == sorted(series.step)
    assert -50.0 in [v for st, v in zip(series.step, series.min, strict=True) if st == 500]
    assert series.step[-1] == 1499


@pytest.mark.slow
def test_series_keeps_spikes_and_stays_within_max_points(metrics: MetricStore) -> None:
    run = "rroll3"
    rng = random.Random(3)
    n = 100_000
    spike_at = 63_457
    pts = [P(seq=i, step=i, key="loss", value=1.0 + rng.random() * 0.01) for i in range(n)]
    pts[spike_at].value = 1000.0
    pts[77_777].value = -5.0
    for i in range(0, n, 25_000):
        metrics.ingest([(run, 1, pts[i : i + 25_000])])
    for max_points in (10, 100, 1000, 5000):
        s = metrics.series(run, "loss", max_points=max_points)
        assert 0 < len(s.step) <= max_points
        assert max(v for v in s.max if v is not None) == 1000.0
        assert min(v for v in s.min if v is not None) == -5.0
        assert sum(s.count) == n
        assert s.source.startswith("rollup-")
    # a zoom that cuts buckets at both ends: edges exact, the spike's bucket found
    s = metrics.series(run, "loss", max_points=50, start=spike_at - 1001, end=spike_at + 999)
    assert sum(s.count) == 2001 and s.step[0] == spike_at - 1001 and max(v for v in s.max if v) == 1000.0
    assert s.last_step[-1] == spike_at + 999
    # small ranges come back raw, point by point
    s = metrics.series(run, "loss", max_points=1000, start=10, end=19)
    assert s.resolution == 1 and s.step == list(range(10, 20)) and s.last == [p.value for p in pts[10:20]]
    # the same answer from the raw points, merged evenly (the audit path)
    audit = metrics.series(run, "loss", max_points=100, include_superseded=True)
    assert len(audit.step) <= 100 and max(v for v in audit.max if v) == 1000.0
    # nothing there
    assert metrics.series(run, "nope", max_points=10).step == []
    assert metrics.series(run, "loss", max_points=10, start=10**9).step == []


def test_series_buckets_agree_with_a_group_by(metrics: MetricStore) -> None:
    run = "rroll4"
    rng = random.Random(4)
    steps = sorted(rng.sample(range(1_000_000), 50_000))  # sparse, irregular logging
    pts = [P(seq=i, step=s, key="k", value=rng.gauss(0, 1)) for i, s in enumerate(steps)]
    metrics.ingest([(run, 1, pts)])
    s = metrics.series(run, "k", max_points=300)
    assert len(s.step) <= 300 and sum(s.count) == 50_000
    # each bucket's min/max equals a GROUP BY over the raw points of that step range
    for i in range(len(s.step)):
        lo, hi = s.step[i], s.last_step[i]
        inside = [p.value for p in pts[bisect.bisect_left(steps, lo) : bisect.bisect_right(steps, hi)]]
        assert s.count[i] == len(inside)
        assert math.isclose(s.min[i] or 0, min(inside)) and math.isclose(s.max[i] or 0, max(inside))


@pytest.mark.postgres
def test_rollups_and_rebuild_on_postgres(pg_url: str) -> None:
    service = f"t{uuid.uuid4().hex[:6]}api"
    engine = migrated(pg_url, service)
    try:
        m = MetricStore(engine)
        run = "rrollpg"
        rng = random.Random(5)
        m.ingest([(run, 1, batch(0, list(range(3000)), rng=rng)), (run, 1, batch(0, list(range(3000)), rng=rng))])
        assert m.attempt_started(run, 2, 1234, None, T0) == 3000 - 1235
        m.ingest([(run, 2, batch(0, list(range(1235, 2000)), rng=rng))])
        m.ingest([(run, 1, [P(seq=5000, step=2500, key="loss", value=7.0)])])  # late: superseded
        assert stored_rollups(m, run) == brute_rollups(m, run)
        s = m.series(run, "loss", max_points=50)
        assert len(s.step) <= 50 and sum(s.count) == 2000
    finally:
        engine.dispose()
        drop = make_engine(pg_url, service)
        with drop.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema_name(service)}" CASCADE'))
        drop.dispose()
