"""Crafted observation streams for detector tests (deterministic: seeded noise)."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone

from choline_core.events import GpuReport, Heartbeat, MetricBatch, MetricPoint
from choline_monitor.detectors import Beat, Detector, End, GpuUtil, Point, Signal

T0 = 1_700_000_000.0


def pts(key: str, values: Sequence[float | None], *, start: int = 1, t0: float = T0, dt: float = 0.1) -> list[Point]:
    out = []
    for i, v in enumerate(values):
        step = start + i
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            raw = "nan" if v is None or math.isnan(v) else ("inf" if v > 0 else "-inf")
            out.append(Point(step, key, None, t0 + i * dt, 1, raw))
        else:
            out.append(Point(step, key, float(v), t0 + i * dt, 1))
    return out


def noisy(n: int, level: float | Sequence[float], rel: float = 0.1, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    levels = [level] * n if isinstance(level, (int, float)) else list(level)
    return [max(1e-9, lv * (1 + rel * rng.gauss(0, 1))) for lv in levels[:n]]


def decaying(n: int, start: float = 2.3, end: float = 0.05, rel: float = 0.1, seed: int = 0) -> list[float]:
    levels = [end + (start - end) * math.exp(-5 * i / n) for i in range(n)]
    return noisy(n, levels, rel, seed)


def beats(
    steps: Sequence[int | None],
    *,
    t0: float = T0,
    dt: float = 5.0,
    util: float | Sequence[float] | None = 90.0,
    phase: str | None = "training",
    cpu: float = 100.0,
) -> list[Beat]:
    utils = [util] * len(steps) if util is None or isinstance(util, (int, float)) else list(util)
    return [
        Beat(t0 + i * dt, s, phase, (GpuUtil(0, u),) if u is not None else (), cpu, 1)
        for i, (s, u) in enumerate(zip(steps, utils, strict=False))
    ]


def run(detector: Detector, observations: Iterable[Point | Beat | End]) -> list[Signal]:
    out = []
    for o in observations:
        if isinstance(o, Point):
            s = detector.on_point(o)
        elif isinstance(o, Beat):
            s = detector.on_beat(o)
        else:
            s = detector.on_end(o)
        if s is not None:
            out.append(s)
    return out


def batch(run_id: str, values: list[float | None], *, start: int = 1, seq0: int = 1, key: str = "loss") -> MetricBatch:
    points = []
    for i, v in enumerate(values):
        ts = datetime.fromtimestamp(T0 + (start + i) * 0.1, timezone.utc)
        raw = None if v is not None else "nan"
        points.append(MetricPoint(seq=seq0 + i, step=start + i, key=key, value=v, raw=raw, ts=ts))
    return MetricBatch(run_id=run_id, attempt=1, points=points)


def hb(run_id: str, step: int | None, t: float, attempt: int = 1, util: float = 90.0, seq: int = 0) -> Heartbeat:
    return Heartbeat(
        box_id=f"b{attempt}",
        run_id=run_id,
        attempt=attempt,
        agent_version="t",
        seq=seq,
        step=step,
        phase="training",
        gpus=[GpuReport(index=0, util=util)],
    )
