"""Score detector settings on the TUNING half of the corpus (the held-out half is bench/monitor's).

    python services/monitor/corpus/tune.py                         # the defaults
    python services/monitor/corpus/tune.py --set spike.z=12 --set throughput.drop=0.7
    python services/monitor/corpus/tune.py --detail                # every finding on every run

Prints the recall per detector, the false positives on healthy runs with what fired, and the
misses, so a change of threshold can be judged before it becomes a default in config.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from choline_monitor.config import MonitorConfig, parse_overrides
from choline_monitor.corpus import load_corpus
from choline_monitor.evaluate import run_all, score


def main() -> None:
    ap = argparse.ArgumentParser(description="score detector settings on the tuning half")
    ap.add_argument("--set", action="append", default=[], help="an override, e.g. divergence.k=5")
    ap.add_argument("--path", type=Path, default=None, help="a corpus folder (default: the frozen one)")
    ap.add_argument("--detail", action="store_true")
    args = ap.parse_args()
    config = MonitorConfig().with_overrides(parse_overrides(args.set))
    runs = load_corpus("tune", args.path)
    results = run_all(runs, config)
    report = score(results)
    w = sys.stdout.write
    w(f"tuning half: {report.runs} runs, {report.healthy} healthy\n")
    for d, r in report.recall.items():
        if r["labelled"]:
            w(
                f"  {d:11s} recall {r['recall']:.3f} ({r['detected']}/{r['labelled']})"
                f"  delay median {r['delay_steps_median']} p90 {r['delay_steps_p90']} steps"
                f"  missed {r['missed']}\n"
            )
    w(f"  false positives {len(report.fp_runs)}/{report.healthy} = {report.fpr:.3f}: {report.fp_runs}\n")
    w(f"  on healthy runs by detector: {report.healthy_findings_by_detector}\n")
    w(f"  off-target on broken runs: {json.dumps(report.off_target)}\n")
    for res in results:
        if args.detail or (res.run.healthy and res.findings):
            w(f"{res.run.run_id} {res.run.labels}\n")
            for f in res.findings:
                w(f"    {f.detector:10s} {f.severity:8s} step {f.step}: {f.message[:140]}\n")


if __name__ == "__main__":
    main()
