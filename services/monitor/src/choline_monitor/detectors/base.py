"""What detectors eat and what they say.

Detectors are pure and deterministic: no clock, no I/O, no randomness. They see a run's
observations in order (``Point``, ``Beat``, ``End``, attempt and state changes) and answer with
at most one ``Signal`` each time. A signal is level-triggered: it repeats as long as the
condition holds, and ``FindingGate`` turns the repeats into one finding per problem.

A detector's whole state is plain JSON (numbers, strings, lists, dicts) in its instance
attributes, so the service can persist it between messages and a restarted monitor carries on
where it stopped (``state()``/``restore()``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import DetectorConfig

INFO, WARNING, CRITICAL = "info", "warning", "critical"


@dataclass(frozen=True)
class Point:
    """One metric point, its key already mapped to the canonical name (``loss``, ``val_loss``...)."""

    step: int
    key: str
    value: float | None  # None: not finite (see raw)
    t: float  # seconds since the epoch, when the training script logged it
    attempt: int = 1
    raw: str | None = None
    epoch: int | None = None


@dataclass(frozen=True)
class GpuUtil:
    index: int
    util: float | None


@dataclass(frozen=True)
class Beat:
    """A heartbeat of the run's box."""

    t: float
    step: int | None
    phase: str | None = "training"
    gpus: tuple[GpuUtil, ...] = ()
    cpu_percent: float | None = None
    attempt: int | None = None

    @property
    def util(self) -> float | None:
        vals = [g.util for g in self.gpus if g.util is not None]
        return sum(vals) / len(vals) if vals else None


@dataclass(frozen=True)
class End:
    """An attempt ended."""

    t: float
    attempt: int
    reason: str
    exit_code: int | None
    last_step: int | None = None
    traceback_tail: str | None = None


@dataclass
class Signal:
    """A detector saying "this is wrong now". ``score`` is its "how bad" number (bigger = worse)."""

    detector: str
    severity: str
    step: int | None
    t: float
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    score: float = 1.0
    episode_key: str | None = None


class Detector:
    """Base class: override the ``on_*`` methods a detector needs."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[DetectorConfig]] = DetectorConfig

    def __init__(self, config: DetectorConfig) -> None:
        self.cfg = config

    # --- observations -------------------------------------------------------------------
    def on_point(self, p: Point) -> Signal | None:
        return None

    def on_beat(self, b: Beat) -> Signal | None:
        return None

    def on_end(self, e: End) -> Signal | None:
        return None

    def on_attempt(self, attempt: int, t: float, resumed_from_step: int | None) -> None:
        """A new attempt starts (a recovery or a resume): forget what belonged to the old box."""

    def on_active(self, active: bool, t: float) -> None:
        """The run left or entered a state in which it should be training (pause, resume, end)."""

    # --- persistence ----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "cfg"}

    def restore(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            if k != "cfg" and hasattr(self, k):
                setattr(self, k, v)

    def signal(self, severity: str, step: int | None, t: float, message: str, **kw: Any) -> Signal:
        return Signal(self.name, severity, step, t, message, **kw)


# ------------------------------------------------------------------------------------ helpers
def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return math.nan
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def mad(xs: list[float], med: float | None = None) -> float:
    """Median absolute deviation."""
    m = median(xs) if med is None else med
    return median([abs(x - m) for x in xs])


def push(window: list[Any], value: Any, size: int) -> None:
    """Append and keep the last ``size`` items (a list, so the state stays plain JSON)."""
    window.append(value)
    if len(window) > size:
        del window[: len(window) - size]


def sig(x: float | None, digits: int = 5) -> float | None:
    """A number rounded for evidence (readable, and stable across platforms)."""
    if x is None or not math.isfinite(x):
        return x
    return float(f"{x:.{digits}g}")
