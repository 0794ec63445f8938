"""Detectors that read the box and the process: stall, throughput drop, idle device, crash."""

from __future__ import annotations

import signal as _signal
from typing import Any

from ..config import CrashConfig, GpuUtilConfig, StallConfig, ThroughputConfig
from .base import CRITICAL, WARNING, Beat, Detector, End, Point, Signal, median, push, sig


class StallDetector(Detector):
    """The box keeps sending heartbeats but the training step does not move."""

    name = "stall"
    config_cls = StallConfig
    cfg: StallConfig

    def __init__(self, config: StallConfig) -> None:
        super().__init__(config)
        self.progress_step = -1
        self.progress_t: float | None = None
        self.beats = 0
        self.pace: list[list[float]] = []  # [t, step] at recent progress
        self.active = True

    def _progress(self, step: int, t: float) -> None:
        push(self.pace, [t, step], 32)
        self.progress_step = step
        self.progress_t = t if self.progress_t is None else max(self.progress_t, t)
        self.beats = 0

    def seconds_per_step(self) -> float | None:
        if len(self.pace) < 2:
            return None
        (t0, s0), (t1, s1) = self.pace[0], self.pace[-1]
        return (t1 - t0) / (s1 - s0) if s1 > s0 and t1 > t0 else None

    def on_point(self, p: Point) -> Signal | None:
        if p.step > self.progress_step:
            self._progress(p.step, p.t)
        return None

    def on_beat(self, b: Beat) -> Signal | None:
        c = self.cfg
        if not self.active:
            return None
        if b.phase not in c.phases:
            self.beats, self.progress_t = 0, b.t
            return None
        if b.step is not None and b.step > self.progress_step:
            self._progress(b.step, b.t)
            return None
        if self.progress_step < 0 or self.progress_t is None:
            return None  # not training yet: fetching data, compiling, ...
        self.beats += 1
        silence = b.t - self.progress_t
        pace = self.seconds_per_step()
        need = max(c.min_seconds, c.factor * pace if pace else 0.0)
        if self.beats < c.min_heartbeats or silence < need:
            return None
        critical = silence >= c.critical_after_s
        return self.signal(
            CRITICAL if critical else WARNING,
            self.progress_step,
            b.t,
            f"stalled: no step past {self.progress_step} for {silence:.0f}s while the box keeps reporting "
            f"({self.beats} heartbeats); a hung data loader, a deadlock or a stuck collective are the usual causes",
            evidence={
                "step": self.progress_step,
                "silent_s": round(silence, 1),
                "heartbeats": self.beats,
                "seconds_per_step": sig(pace),
                "threshold_s": round(need, 1),
                "cpu_percent": b.cpu_percent,
                "util": sig(b.util, 3),
            },
            score=silence,
        )

    def on_end(self, e: End) -> Signal | None:
        self.active = False
        return None

    def on_attempt(self, attempt: int, t: float, resumed_from_step: int | None) -> None:
        self.progress_step = resumed_from_step if resumed_from_step is not None else -1
        self.progress_t, self.beats, self.pace, self.active = t, 0, [], True

    def on_active(self, active: bool, t: float) -> None:
        self.active = active
        self.progress_t, self.beats = t, 0


class ThroughputDetector(Detector):
    """Throughput fell well below the best level this attempt sustained."""

    name = "throughput"
    config_cls = ThroughputConfig
    cfg: ThroughputConfig

    def __init__(self, config: ThroughputConfig) -> None:
        super().__init__(config)
        self.win: list[float] = []
        self.n = 0
        self.best: float | None = None
        self.best_step = 0
        self.seen_key = False
        self.anchor: list[float] | None = None  # [t, step] for steps/s from timestamps

    def on_point(self, p: Point) -> Signal | None:
        c = self.cfg
        if p.key == c.key:
            if p.value is None or p.value <= 0:
                return None
            if not self.seen_key:  # a real throughput key replaces the derived rate
                self.seen_key, self.win, self.n, self.best = True, [], 0, None
            return self._observe(p.value, p.step, p.t, "samples/s")
        if self.seen_key or p.key != "loss":
            return None
        if self.anchor is None or p.step < self.anchor[1]:
            self.anchor = [p.t, p.step]
            return None
        dt, ds = p.t - self.anchor[0], p.step - self.anchor[1]
        if ds < c.derive_every or dt <= 0:
            return None
        self.anchor = [p.t, p.step]
        return self._observe(ds / dt, p.step, p.t, "steps/s")

    def _observe(self, v: float, step: int, t: float, unit: str) -> Signal | None:
        c = self.cfg
        push(self.win, v, c.window)
        self.n += 1
        if self.n < c.warmup + c.window:
            return None
        level = median(self.win)
        if self.best is None or level > self.best:
            self.best, self.best_step = level, step
            return None
        if level >= (1 - c.drop) * self.best:
            return None
        return self.signal(
            WARNING,
            step,
            t,
            f"throughput dropped to {level:.4g} {unit}, {level / self.best:.0%} of the {self.best:.4g} it sustained "
            f"at step {self.best_step}: slower input (storage, network, loader), throttling or a noisy neighbour",
            evidence={
                "throughput": sig(level),
                "best": sig(self.best),
                "best_step": self.best_step,
                "fraction": sig(level / self.best, 3),
                "unit": unit,
                "window": c.window,
            },
            score=self.best / level if level > 0 else 1e9,
        )

    def _reset(self) -> None:
        self.win, self.n, self.best, self.anchor = [], 0, None, None

    def on_attempt(self, attempt: int, t: float, resumed_from_step: int | None) -> None:
        self._reset()  # a new box has its own speed

    def on_active(self, active: bool, t: float) -> None:
        if active:
            self._reset()


class GpuUtilDetector(Detector):
    """Low device utilisation while training progresses: the input pipeline cannot keep up."""

    name = "gpu_util"
    config_cls = GpuUtilConfig
    cfg: GpuUtilConfig

    def __init__(self, config: GpuUtilConfig) -> None:
        super().__init__(config)
        self.last_step: int | None = None
        self.seen = 0
        self.win: list[float] = []
        self.per_gpu: dict[str, list[float]] = {}
        self.cpu: list[float] = []
        self.active = True

    def on_beat(self, b: Beat) -> Signal | None:
        c = self.cfg
        if not self.active or b.phase not in ("training", None) or b.step is None:
            return None
        progressed = self.last_step is not None and b.step > self.last_step
        self.last_step = b.step if self.last_step is None else max(self.last_step, b.step)
        u = b.util
        if not progressed or u is None:
            return None  # no progress is the stall detector's business
        self.seen += 1
        if self.seen <= c.warmup:
            return None
        push(self.win, u, c.window)
        for g in b.gpus:
            if g.util is not None:
                push(self.per_gpu.setdefault(str(g.index), []), g.util, c.window)
        if b.cpu_percent is not None:
            push(self.cpu, b.cpu_percent, c.window)
        if len(self.win) < c.window:
            return None
        mean = sum(self.win) / len(self.win)
        cpu = sum(self.cpu) / len(self.cpu) if self.cpu else None
        evidence: dict[str, Any] = {
            "util_mean": round(mean, 1),
            "heartbeats": len(self.win),
            "threshold": c.threshold,
            "cpu_percent": round(cpu, 1) if cpu is not None else None,
            "per_gpu": {k: round(sum(v) / len(v), 1) for k, v in self.per_gpu.items() if v},
        }
        if mean < c.threshold:
            return self.signal(
                WARNING,
                b.step,
                b.t,
                f"the device is busy only {mean:.0f}% of the time while training (last {len(self.win)} heartbeats"
                + (f", CPU at {cpu:.0f}%" if cpu is not None else "")
                + "): the input pipeline is the bottleneck; more loader workers, prefetching, pinned memory or "
                "faster storage would help, and a smaller box would cost less",
                evidence=evidence,
                score=c.threshold / max(mean, 1.0),
            )
        full = {k: sum(v) / len(v) for k, v in self.per_gpu.items() if len(v) >= c.window}
        idle = sorted(k for k, v in full.items() if v < c.idle_gpu)
        if idle and len(idle) < len(full):
            evidence["idle_gpus"] = idle
            return self.signal(
                WARNING,
                b.step,
                b.t,
                f"GPU {', '.join(idle)} idle while the others work: the script may not use every GPU it pays for",
                evidence=evidence,
                score=float(len(idle)),
            )
        return None

    def on_end(self, e: End) -> Signal | None:
        self.active = False
        return None

    def on_attempt(self, attempt: int, t: float, resumed_from_step: int | None) -> None:
        self.last_step, self.seen, self.win, self.per_gpu, self.cpu, self.active = None, 0, [], {}, [], True

    def on_active(self, active: bool, t: float) -> None:
        self.active = active
        self.last_step, self.seen, self.win, self.per_gpu, self.cpu = None, 0, [], {}, []


def _signal_name(code: int) -> str | None:
    num = -code if code < 0 else code - 128 if 128 < code < 160 else None
    if num is None:
        return None
    try:
        return _signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def exception_line(stderr_tail: str | None) -> str | None:
    """The exception a Python traceback ends with (``IndexError: ...``), or None.

    The tail of stderr is not always a traceback (warnings, logs): only text after the last
    ``Traceback (most recent call last):`` counts, and its exception is the last line that is not
    indented.
    """
    text = stderr_tail or ""
    head = "Traceback (most recent call last):"
    if head not in text:
        return None
    tail = text.rsplit(head, 1)[1]
    lines = [ln.rstrip() for ln in tail.splitlines() if ln.strip()]
    unindented = [ln for ln in lines if not ln[:1].isspace()]
    return unindented[-1].strip() if unindented else None


class CrashDetector(Detector):
    """An attempt ended with a non-zero exit code that nobody asked for."""

    name = "crash"
    config_cls = CrashConfig
    cfg: CrashConfig

    def on_end(self, e: End) -> Signal | None:
        if e.exit_code in (0, None) or e.reason.lower() in self.cfg.ignore_reasons:
            return None
        code = int(e.exit_code)
        error = exception_line(e.traceback_tail)
        signame = _signal_name(code)
        if signame:
            hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if signame == "SIGKILL" else ""
            msg = f"killed by {signame} at step {e.last_step}{hint}"
        elif error:
            msg = f"crashed at step {e.last_step}: {error}"
        else:
            msg = f"exited with code {code} at step {e.last_step}"
        return self.signal(
            CRITICAL,
            e.last_step,
            e.t,
            msg,
            evidence={
                "attempt": e.attempt,
                "exit_code": code,
                "signal": signame,
                "error": error,
                "reason": e.reason,
                "traceback_tail": (e.traceback_tail or "")[-1500:] or None,
            },
            episode_key=f"attempt-{e.attempt}",
        )
