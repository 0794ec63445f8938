"""bench/monitor: the detectors on the HELD-OUT half of the frozen evaluation corpus.

Replays every held-out run through the monitor's real event path (MetricBatch, Heartbeat and
AttemptEnded events into ``RunWatch``, exactly what the service feeds it) with the default
``MonitorConfig``, and reports:

- recall per detector (a finding of that detector at or after the labelled onset step),
- the false-positive rate: healthy runs with any finding at all, of any severity,
- detection delay (median and p90, in steps; median in seconds),
- deduplication: raw detector signals vs findings raised,
- a baseline measured in the same run: the same detectors with naive settings (no smoothing,
  no warm-up, no robust thresholds), to show what the tuned defaults buy,
- replay speed (metric points per second through the event path).

Goal (issue 14): recall >= 0.95 for every detector and false positives <= 2% of healthy runs.
The last line printed is one JSON object.
"""

from __future__ import annotations

import json
import sys
import time

from choline_monitor.config import MonitorConfig
from choline_monitor.corpus import load_corpus, load_manifest
from choline_monitor.evaluate import run_all, score

GOAL_RECALL = 0.95
GOAL_FPR = 0.02

NAIVE = {
    "divergence": {"window": 1, "warmup": 1, "min_regress": 0.0},
    "spike": {"min_history": 5, "z": 3.0, "ratio": 1.0, "min_jump": 0.0},
    "plateau": {"window": 1, "patience_frac": 0.0},
    "overfit": {"patience": 1, "min_rise": 0.0, "min_train_drop": 0.0},
    "throughput": {"window": 2, "warmup": 0},
    "gpu_util": {"window": 1, "warmup": 0},
}


def main() -> None:
    w = sys.stdout.write
    manifest = load_manifest()
    runs = load_corpus("heldout")
    points = sum(len(v) for r in runs for v in r.metrics.values())
    w(f"corpus: {manifest['runs']} runs recorded on {manifest['recorded_on']}; held-out half: {len(runs)} runs\n")

    t0 = time.perf_counter()
    results = run_all(runs, MonitorConfig(), events=True)
    elapsed = time.perf_counter() - t0
    report = score(results)
    baseline = score(run_all(runs, MonitorConfig().with_overrides(NAIVE)))

    w(f"\nheld-out: {report.runs} runs, {report.healthy} healthy\n")
    w(
        f"{'detector':12s} {'recall':>8s} {'found':>7s} {'strict':>7s} {'delay p50':>10s} {'p90':>6s} {'p50 s':>7s}"
        "  baseline\n"
    )
    recall: dict[str, float] = {}
    delays: dict[str, float | None] = {}
    for d, r in report.recall.items():
        if not r["labelled"]:
            continue
        recall[d] = r["recall"]
        delays[d] = r["delay_steps_median"]
        b = baseline.recall[d]["recall"]
        w(
            f"{d:12s} {r['recall']:8.3f} {r['detected']:>3d}/{r['labelled']:<3d} {r['recall_strict']:7.3f} "
            f"{r['delay_steps_median']!s:>10s} {r['delay_steps_p90']!s:>6s} {r['delay_s_median']!s:>7s}  {b:.3f}\n"
        )
        if r["missed"]:
            w(f"{'':12s} missed: {', '.join(r['missed'])}\n")
    w(
        f"\nfalse positives on healthy runs: {len(report.fp_runs)}/{report.healthy} = {report.fpr:.3f}"
        f" (baseline {baseline.fpr:.3f}, {len(baseline.fp_runs)}/{baseline.healthy})\n"
    )
    if report.fp_runs:
        w(f"  runs: {', '.join(report.fp_runs)}; by detector {report.healthy_findings_by_detector}\n")
    allowed = sum(1 for r in runs if r.healthy and "throughput" in r.allow)
    w(
        f"  ({allowed} of the {report.healthy} healthy runs slowed down moderately on the shared machine: a"
        " throughput finding there counts neither way)\n"
    )
    w(f"off-target findings on broken runs: {json.dumps(report.off_target)}\n")
    dedup = report.signals / report.findings if report.findings else 0.0
    w(f"signals {report.signals} -> findings {report.findings} ({dedup:.1f} signals per finding)\n")
    w(f"replay: {points} points in {elapsed:.2f}s = {points / elapsed:,.0f} points/s through the event path\n")

    min_recall = report.min_recall
    met = min_recall >= GOAL_RECALL and report.fpr <= GOAL_FPR
    w(
        json.dumps(
            {
                "name": "monitor",
                "split": "heldout",
                "runs": report.runs,
                "healthy_runs": report.healthy,
                "min_recall": round(min_recall, 4),
                "recall": recall,
                "recall_strict": {d: r["recall_strict"] for d, r in report.recall.items() if r["labelled"]},
                "fpr": round(report.fpr, 4),
                "false_positive_runs": report.fp_runs,
                "delay_steps_median": delays,
                "signals_per_finding": round(dedup, 2),
                "points_per_s": round(points / elapsed),
                "baseline_naive": {"min_recall": round(baseline.min_recall, 4), "fpr": round(baseline.fpr, 4)},
                "goal": f"recall >= {GOAL_RECALL} for every detector and false positives <= {GOAL_FPR:.0%} "
                "of healthy runs, on the held-out half",
                "met": met,
            }
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
