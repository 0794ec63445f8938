"""Score the detectors on labelled corpus runs: recall, false positives, detection delay.

- recall of detector D: of the runs labelled D, the share where D raised a finding and was still
  signalling at or after the labelled onset step (a finding raised just before the onset of a
  problem that is still going on counts; one whose signals all ended before it is "early");
- false-positive rate: the share of healthy runs (no label) with any finding from a detector not
  in the run's ``allow`` list (``fpr``), and the same for findings of severity warning or worse
  (``fpr_alarm``);
- ``recall_strict``: the same, counting only findings raised at or after the onset;
- delay: steps (and seconds) from the onset to D's first finding at or after it (0 when the
  finding came before the onset and was still standing);
- off-target: findings on broken runs from detectors neither labelled nor allowed for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import SEVERITY_RANK, MonitorConfig
from .corpus import CorpusRun, replay
from .detectors import DETECTOR_NAMES
from .watch import Finding


@dataclass
class RunResult:
    run: CorpusRun
    findings: list[Finding]
    signals: int
    trace: list[tuple[str, int | None]] = field(default_factory=list)

    def first(self, detector: str, from_step: int = -(10**12)) -> Finding | None:
        for f in self.findings:
            if f.detector == detector and (f.step is None or f.step >= from_step):
                return f
        return None

    def detected(self, detector: str, onset: int) -> tuple[float, float] | None:
        """(the step, the time) from which the user knew, or None when D missed the problem."""
        if not any(f.detector == detector for f in self.findings):
            return None
        if not any(d == detector and (s is None or s >= onset) for d, s in self.trace):
            return None  # its signals all ended before the problem began: it saw something else
        f = self.first(detector, onset)
        if f is not None:
            return float(f.step if f.step is not None else onset), f.t
        early = next(f for f in self.findings if f.detector == detector)  # told before the onset
        return float(onset), early.t


@dataclass
class Report:
    runs: int
    healthy: int
    fp_runs: list[str]
    alarm_runs: list[str]
    recall: dict[str, dict[str, Any]]
    off_target: dict[str, list[str]]
    findings: int
    signals: int
    healthy_findings_by_detector: dict[str, int] = field(default_factory=dict)

    @property
    def fpr(self) -> float:
        return len(self.fp_runs) / self.healthy if self.healthy else 0.0

    @property
    def fpr_alarm(self) -> float:
        return len(self.alarm_runs) / self.healthy if self.healthy else 0.0

    @property
    def min_recall(self) -> float:
        vals = [r["recall"] for r in self.recall.values() if r["labelled"]]
        return min(vals) if vals else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "healthy_runs": self.healthy,
            "fpr": round(self.fpr, 4),
            "fpr_alarm": round(self.fpr_alarm, 4),
            "false_positive_runs": self.fp_runs,
            "min_recall": round(self.min_recall, 4),
            "recall": self.recall,
            "off_target": self.off_target,
            "findings": self.findings,
            "signals": self.signals,
            "healthy_findings_by_detector": self.healthy_findings_by_detector,
        }


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def _unexpected(res: RunResult) -> list[Finding]:
    return [f for f in res.findings if f.detector not in res.run.allow]


def run_all(runs: Sequence[CorpusRun], config: MonitorConfig | None = None, *, events: bool = False) -> list[RunResult]:
    out = []
    for r in runs:
        findings, watch = replay(r, config, events=events)
        out.append(RunResult(r, findings, watch.signals, list(watch.trace or [])))
    return out


def score(results: Sequence[RunResult]) -> Report:
    recall: dict[str, dict[str, Any]] = {}
    for d in DETECTOR_NAMES:
        labelled = [res for res in results if d in res.run.labels]
        hits, early, strict, delays, delays_s, missed = 0, 0, 0, [], [], []
        for res in labelled:
            onset = res.run.labels[d]
            strict += res.first(d, onset) is not None
            hit = res.detected(d, onset)
            if hit is None:
                missed.append(res.run.run_id)
                if res.first(d) is not None:
                    early += 1
                continue
            hits += 1
            step, t = hit
            delays.append(step - onset)
            delays_s.append(max(0.0, t - res.run.onset_time(onset)))
        recall[d] = {
            "labelled": len(labelled),
            "detected": hits,
            "recall": round(hits / len(labelled), 4) if labelled else None,
            "recall_strict": round(strict / len(labelled), 4) if labelled else None,
            "missed": missed,
            "early_only": early,
            "delay_steps_median": _pct(delays, 0.5),
            "delay_steps_p90": _pct(delays, 0.9),
            "delay_s_median": round(v, 2) if (v := _pct(delays_s, 0.5)) is not None else None,
        }
    healthy = [res for res in results if res.run.healthy]
    fp = [res.run.run_id for res in healthy if _unexpected(res)]
    alarm = [
        res.run.run_id
        for res in healthy
        if any(SEVERITY_RANK[f.severity] >= SEVERITY_RANK["warning"] for f in _unexpected(res))
    ]
    by_det: dict[str, int] = {}
    for res in healthy:
        for d in {f.detector for f in _unexpected(res)}:
            by_det[d] = by_det.get(d, 0) + 1
    off: dict[str, list[str]] = {}
    for res in results:
        if res.run.healthy:
            continue
        ok = set(res.run.labels) | set(res.run.allow)
        for d in sorted({f.detector for f in res.findings} - ok):
            off.setdefault(d, []).append(res.run.run_id)
    return Report(
        runs=len(results),
        healthy=len(healthy),
        fp_runs=fp,
        alarm_runs=alarm,
        recall=recall,
        off_target=off,
        findings=sum(len(r.findings) for r in results),
        signals=sum(r.signals for r in results),
        healthy_findings_by_detector=by_det,
    )


def evaluate(runs: Sequence[CorpusRun], config: MonitorConfig | None = None, *, events: bool = False) -> Report:
    return score(run_all(runs, config, events=events))
