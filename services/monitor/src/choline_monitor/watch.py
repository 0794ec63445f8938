"""One run under watch: the detectors, the gate that turns their signals into findings, and state.

``RunWatch`` is pure: it takes the run's events (metric batches, heartbeats, attempt ends, state
changes), runs every enabled detector, and returns the new ``Finding``s. It never reads a clock;
times come from the events. Its whole state is JSON (``state()``), so the service stores it after
each message and a restarted monitor rebuilds the same watch (``RunWatch(..., state=...)``).

Replays are harmless: metric points at or below the highest ``seq`` already seen for their
attempt are skipped, and a box's heartbeat not newer than its last one is skipped, so a message
delivered twice changes nothing.

``FindingGate`` groups signals into episodes (see ``DetectorConfig``). A finding's id is
``finding_id(run, detector, episode)``: deterministic, so the same stream always names the same
findings, and a store that is unique on the id can never hold one twice.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from choline_core.events import (
    AttemptEnded,
    AttemptStarted,
    Envelope,
    FindingRaised,
    Heartbeat,
    MetricBatch,
    MetricPoint,
    RunState,
    RunStateChanged,
    Severity,
)
from choline_core.logs import redact

from .config import SEVERITY_RANK, DetectorConfig, MonitorConfig
from .detectors import DETECTORS, Beat, Detector, End, GpuUtil, Point, Signal

STATE_VERSION = 1


def finding_id(run_id: str, detector: str, episode: int) -> str:
    """The id of a run's ``episode``-th finding from ``detector`` (32 hex characters)."""
    return hashlib.sha256(f"{run_id}/{detector}/{episode}".encode()).hexdigest()[:32]


def _ts(value: datetime | float) -> float:
    return value if isinstance(value, (int, float)) else value.timestamp()


@dataclass
class Finding:
    """A problem found in a run: what, how bad, where (step) and the numbers that show it."""

    id: str
    run_id: str
    detector: str
    severity: str
    step: int | None
    t: float
    message: str
    evidence: dict[str, Any]
    episode: int
    attempt: int | None = None
    supersedes: str | None = None

    def event(self) -> FindingRaised:
        evidence = dict(self.evidence)
        evidence["episode"] = self.episode
        if self.supersedes:
            evidence["supersedes"] = self.supersedes
        return FindingRaised(
            finding_id=self.id,
            run_id=self.run_id,
            detector=self.detector,
            severity=Severity(self.severity),
            step=self.step,
            message=self.message,
            evidence=evidence,
        )

    def envelope(self) -> Envelope:
        """The event, with the finding id as its message id (a re-publish is a duplicate) and the data's time."""
        env = self.event().envelope(id=self.id)
        return env.model_copy(update={"ts": datetime.fromtimestamp(self.t, timezone.utc)})


@dataclass
class FindingGate:
    """Signals -> findings: one per episode, unless a worse signal breaks through."""

    episodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    suppressed: int = 0

    def admit(
        self, run_id: str, s: Signal, cfg: DetectorConfig, attempt: int | None = None
    ) -> tuple[Finding | None, bool]:
        """(the new finding or None, whether this signal opened a new episode)."""
        st = self.episodes.get(s.detector)
        supersedes = None
        if st is not None:
            quiet = (
                (s.episode_key is not None and s.episode_key != st["key"])
                or (s.step is not None and st["step"] is not None and s.step - st["step"] >= cfg.cooldown_steps)
                or (s.t - st["t"] >= cfg.cooldown_s)
            )
            if not quiet:
                if s.step is not None:
                    st["step"] = s.step if st["step"] is None else max(st["step"], s.step)
                st["t"] = max(st["t"], s.t)
                worse = SEVERITY_RANK[s.severity] > SEVERITY_RANK[st["severity"]] or (
                    cfg.breakthrough is not None and s.score >= cfg.breakthrough * st["score"]
                )
                if not worse or st.get("breakthroughs", 0) >= cfg.breakthrough_limit:
                    self.suppressed += 1
                    return None, False
                supersedes = st["id"]
        new_episode = supersedes is None
        episode = st["episode"] + 1 if st else 1
        fid = finding_id(run_id, s.detector, episode)
        # inside an episode the gate remembers the worst seen, so a milder repeat stays quiet
        severity, score = s.severity, s.score
        if st is not None and not new_episode:
            severity = max(severity, st["severity"], key=SEVERITY_RANK.__getitem__)
            score = max(score, st["score"])
        self.episodes[s.detector] = {
            "episode": episode,
            "key": s.episode_key,
            "step": s.step if new_episode or st is None else st["step"],
            "t": s.t if new_episode or st is None else st["t"],
            "severity": severity,
            "score": score,
            "id": fid,
            "breakthroughs": 0 if new_episode or st is None else st.get("breakthroughs", 0) + 1,
        }
        evidence = {k: _clean(v) for k, v in s.evidence.items()}
        finding = Finding(
            id=fid,
            run_id=run_id,
            detector=s.detector,
            severity=s.severity,
            step=s.step,
            t=s.t,
            message=redact(s.message),
            evidence=evidence,
            episode=episode,
            attempt=attempt,
            supersedes=supersedes,
        )
        return finding, new_episode


def _clean(v: Any) -> Any:
    """Evidence as strict JSON: non-finite numbers spelled out, secrets redacted from text."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return redact(v)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


_INACTIVE = {
    RunState.queued,
    RunState.scheduled,
    RunState.provisioning,
    RunState.syncing,
    RunState.pausing,
    RunState.paused,
    RunState.recovering,
    RunState.finishing,
    RunState.succeeded,
    RunState.failed,
    RunState.cancelled,
}


class RunWatch:
    """Every detector for one run, fed in order; returns the findings each event produces."""

    def __init__(self, run_id: str, config: MonitorConfig | None = None, state: dict[str, Any] | None = None) -> None:
        self.run_id = run_id
        self.config = config or MonitorConfig()
        self._canon = self.config.canonical_keys()
        c = self.config
        for key in (*c.nan.keys, *c.spike.keys, c.throughput.key):  # keys a detector is told to read
            self._canon.setdefault(key, key)
        self._canonical_names = frozenset(self._canon.values())
        self.detectors: list[Detector] = []
        for cls in DETECTORS:
            dcfg = getattr(self.config, cls.name)
            if dcfg.enabled:
                self.detectors.append(cls(dcfg))
        self.gate = FindingGate()
        self.attempt = 0
        self.hw: dict[str, int] = {}  # attempt -> highest metric seq seen
        self.box_t: dict[str, float] = {}  # box -> time of its last heartbeat
        self.ended: list[int] = []
        self.active = True
        self.closed = False
        self.signals = 0
        self.changed = False
        self.trace: list[tuple[str, int | None]] | None = None  # every signal, when asked for (not stored)
        if state:
            self.restore(state)

    # ------------------------------------------------------------------ feeding
    def feed_batch(self, batch: MetricBatch) -> list[Finding]:
        return self.feed_points(batch.points, batch.attempt)

    def feed_points(self, points: Iterable[MetricPoint], attempt: int) -> list[Finding]:
        pts = sorted(points, key=lambda p: p.seq)
        if not pts or attempt < self.attempt:
            return []  # an older attempt's late points: that history is no longer the run's
        if attempt > self.attempt:
            self._new_attempt(attempt, _ts(pts[0].ts), None)
        hw = self.hw.get(str(attempt), -1)
        out: list[Finding] = []
        for mp in pts:
            if mp.seq <= hw:
                continue
            hw = mp.seq
            value = mp.value if mp.value is not None and math.isfinite(mp.value) else None
            raw = mp.raw if value is None else None
            if value is None and raw is None:
                raw = "nan" if mp.value is None or math.isnan(mp.value) else ("inf" if mp.value > 0 else "-inf")
            out.extend(self.observe_point(Point(mp.step, mp.key, value, _ts(mp.ts), attempt, raw, mp.epoch)))
        if hw != self.hw.get(str(attempt), -1):
            self.hw[str(attempt)] = hw
            self.changed = True
        return out

    def feed_heartbeat(self, hb: Heartbeat, ts: datetime | float) -> list[Finding]:
        t = _ts(ts)
        if hb.run_id != self.run_id:
            return []
        last = self.box_t.get(hb.box_id)
        if last is not None and t <= last:
            return []
        self.box_t[hb.box_id] = t
        self.changed = True
        if hb.attempt is not None:
            if hb.attempt < self.attempt or hb.attempt in self.ended:
                return []
            if hb.attempt > self.attempt:
                self._new_attempt(hb.attempt, t, None)
        beat = Beat(
            t=t,
            step=hb.step,
            phase=hb.phase,
            gpus=tuple(GpuUtil(g.index, g.util) for g in hb.gpus),
            cpu_percent=hb.cpu_percent,
            attempt=hb.attempt,
        )
        return self.observe_beat(beat)

    def feed_attempt_started(self, ev: AttemptStarted, ts: datetime | float) -> list[Finding]:
        if ev.attempt > self.attempt:
            self._new_attempt(ev.attempt, _ts(ts), ev.resumed_from_step)
        return []

    def feed_end(self, ev: AttemptEnded, ts: datetime | float) -> list[Finding]:
        if ev.attempt in self.ended:
            return []
        self.ended.append(ev.attempt)
        self.changed = True
        return self.observe_end(End(_ts(ts), ev.attempt, ev.reason, ev.exit_code, ev.last_step, ev.traceback_tail))

    def feed_state(self, ev: RunStateChanged, ts: datetime | float) -> list[Finding]:
        active = ev.state not in _INACTIVE
        if ev.state.terminal and not self.closed:
            self.closed, self.changed = True, True
        if active != self.active:
            self.active, self.changed = active, True
            for d in self.detectors:
                d.on_active(active, _ts(ts))
        return []

    # ------------------------------------------------------------------ observations
    # The feed_* methods check, deduplicate and convert events; these run the detectors. The
    # corpus tools call them directly (no pydantic per point), with the same result.
    def observe_point(self, p: Point) -> list[Finding]:
        if p.key not in self._canonical_names:
            canon = self._canon.get(p.key)
            if canon is None:
                return []  # a metric no detector reads
            p = replace(p, key=canon)
        out: list[Finding] = []
        for d in self.detectors:
            s = d.on_point(p)
            if s is not None:
                out.extend(self._admit(s, p.attempt))
        return out

    def observe_beat(self, b: Beat) -> list[Finding]:
        out: list[Finding] = []
        for d in self.detectors:
            s = d.on_beat(b)
            if s is not None:
                out.extend(self._admit(s, b.attempt))
        return out

    def observe_end(self, e: End) -> list[Finding]:
        out: list[Finding] = []
        for d in self.detectors:
            s = d.on_end(e)
            if s is not None:
                out.extend(self._admit(s, e.attempt))
        return out

    def _new_attempt(self, attempt: int, t: float, resumed_from_step: int | None) -> None:
        self.attempt = attempt
        self.changed = True
        for d in self.detectors:
            d.on_attempt(attempt, t, resumed_from_step)

    def _admit(self, s: Signal, attempt: int | None) -> list[Finding]:
        self.signals += 1
        self.changed = True
        if self.trace is not None:
            self.trace.append((s.detector, s.step))
        finding, _ = self.gate.admit(self.run_id, s, getattr(self.config, s.detector), attempt)
        return [finding] if finding else []

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        return {
            "v": STATE_VERSION,
            "attempt": self.attempt,
            "hw": self.hw,
            "box_t": self.box_t,
            "ended": self.ended,
            "active": self.active,
            "closed": self.closed,
            "signals": self.signals,
            "suppressed": self.gate.suppressed,
            "gate": self.gate.episodes,
            "detectors": {d.name: d.state() for d in self.detectors},
        }

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("v") != STATE_VERSION:
            return  # an unknown layout: start afresh rather than misread it
        self.attempt = int(state.get("attempt", 0))
        self.hw = dict(state.get("hw", {}))
        self.box_t = dict(state.get("box_t", {}))
        self.ended = list(state.get("ended", []))
        self.active = bool(state.get("active", True))
        self.closed = bool(state.get("closed", False))
        self.signals = int(state.get("signals", 0))
        self.gate = FindingGate(dict(state.get("gate", {})), int(state.get("suppressed", 0)))
        saved = state.get("detectors", {})
        for d in self.detectors:
            if d.name in saved:
                d.restore(saved[d.name])
