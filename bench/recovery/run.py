"""bench/recovery: what a lost box costs.

On the embedded control plane (local provider, loss timeout 3 s, the shared base environment),
the digits example trains with steps paced to --step-s (a stand-in for real GPU steps) and a
checkpoint every --every steps. The box is SIGKILLed twice mid-run. Measured:

- kill -> loss declared (the attempt's end), goal <= 5 s with test timeouts;
- kill -> first training step on the new box, goal <= 15 s;
- steps lost per failure (last step before the kill - the step the next attempt resumed from),
  goal <= one checkpoint interval;
- the fraction of billed box time not spent training over the whole run with its two failures,
  goal <= 3 %. It shrinks with the run's length (the setup of each box is fixed); the baseline is
  the same run without failures, measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def cli(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "choline.cli.main", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=1800,
    )


def show(env: dict[str, str], run_id: str) -> dict[str, Any]:
    return dict(json.loads(cli(env, "show", run_id, "--json").stdout))


def ts(text: str | None) -> float:
    return datetime.fromisoformat(str(text)).timestamp() if text else 0.0


def points(env: dict[str, str], run_id: str) -> list[Any]:
    os.environ["CHOLINE_HOME"] = env["CHOLINE_HOME"]
    from choline.client import CholineClient
    from choline_core.settings import CholineSettings

    with CholineClient.from_settings(CholineSettings()) as api:
        return api.metrics(run_id, ["train/loss"], include_superseded=True)


def one_run(env: dict[str, str], project: Path, args: argparse.Namespace, kills: list[float]) -> dict[str, Any]:
    run_args = [
        "--env",
        f"CHOLINE_FAULTS=train.step=sleep:{args.step_s}",
        "train.py",
        "--1xcpu",
        "--epochs",
        str(args.epochs),
        "--checkpoint-every",
        str(args.every),
    ]
    out = cli(env, "run", "--detach", *run_args, cwd=project)
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.strip().splitlines()[-1]
    events: list[dict[str, float]] = []
    for frac in kills:
        info = show(env, run_id)
        while (
            info["state"] != "running"
            or len(info["attempts"]) != len(events) + 1
            or not info["attempts"][-1]["instance_id"]
        ):
            time.sleep(0.2)
            info = show(env, run_id)
        total = args.epochs * 45
        target = int(total * frac)
        while True:
            pts = [p for p in points(env, run_id) if p.attempt == len(events) + 1]
            if pts and pts[-1].step >= target:
                break
            time.sleep(0.2)
        from choline_provisioner.providers import localbox

        instance = info["attempts"][-1]["instance_id"]
        last_step = max(p.step for p in points(env, run_id) if p.attempt == len(events) + 1)
        t_kill = time.time()
        localbox.kill_box(Path(env["CHOLINE_HOME"]) / "boxes" / instance)
        events.append({"kill": t_kill, "last_step": last_step})
    while show(env, run_id)["state"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.5)
    info = show(env, run_id)
    pts = points(env, run_id)
    by_attempt: dict[int, list[Any]] = {}
    for p in pts:
        by_attempt.setdefault(p.attempt, []).append(p)
    result: dict[str, Any] = {"state": info["state"], "attempts": len(info["attempts"]), "failures": []}
    for i, ev in enumerate(events, start=1):
        ended = ts(info["attempts"][i - 1]["ended_at"])
        nxt = sorted(by_attempt.get(i + 1, []), key=lambda p: p.step)
        first_step = nxt[0].ts.timestamp() if nxt else float("nan")
        resumed = info["attempts"][i]["resumed_from_step"] or 0
        result["failures"].append(
            {
                "loss_declared_s": ended - ev["kill"],
                "first_step_s": first_step - ev["kill"],
                "steps_lost": ev["last_step"] - resumed,
            }
        )
    billed = sum(ts(a["ended_at"]) - ts(a["started_at"]) for a in info["attempts"])
    training = sum(max(p.ts.timestamp() for p in ps) - min(p.ts.timestamp() for p in ps) for ps in by_attempt.values())
    result.update(billed_s=billed, training_s=training, not_training=(billed - training) / billed)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--step-s", type=float, default=0.2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        home, project = Path(d) / "home", Path(d) / "digits"
        shutil.copytree(REPO / "examples" / "digits", project, ignore=shutil.ignore_patterns("choline-runs"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHOLINE_")}
        env.update(
            CHOLINE_HOME=str(home),
            CHOLINE_LOSS_TIMEOUT_S="3",
            CHOLINE_HEARTBEAT_S="0.5",
            CHOLINE_WATCH_INTERVAL_S="0.2",
            CHOLINE_PROBE_TIMEOUT_S="3",
        )
        assert cli(env, "up").returncode == 0
        try:
            base = one_run(env, project, args, [])
            hurt = one_run(env, project, args, [0.35, 0.7])
        finally:
            cli(env, "down")
    fails = hurt["failures"]
    loss = statistics.mean(f["loss_declared_s"] for f in fails)
    first = statistics.mean(f["first_step_s"] for f in fails)
    lost = max(f["steps_lost"] for f in fails)
    for i, f in enumerate(fails, 1):
        print(
            f"failure {i}: loss declared after {f['loss_declared_s']:.1f}s, first step on the new box after "
            f"{f['first_step_s']:.1f}s, {f['steps_lost']} steps lost"
        )
    print(
        f"billed {hurt['billed_s']:.0f}s, training {hurt['training_s']:.0f}s: {100 * hurt['not_training']:.1f}% "
        f"not training (without failures: {100 * base['not_training']:.1f}% of {base['billed_s']:.0f}s)"
    )
    met = loss <= 5 and first <= 15 and lost <= args.every and hurt["not_training"] <= 0.03
    print(
        json.dumps(
            {
                "name": "recovery",
                "loss_declared_s": round(loss, 2),
                "first_step_new_box_s": round(first, 2),
                "steps_lost_max": lost,
                "checkpoint_every": args.every,
                "not_training_fraction": round(hurt["not_training"], 4),
                "baseline_not_training_fraction": round(base["not_training"], 4),
                "billed_s": round(hurt["billed_s"], 1),
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "goal": "loss <= 5 s, first step <= 15 s, steps lost <= one interval, not training <= 3 %",
                "met": met,
            }
        )
    )


if __name__ == "__main__":
    main()
