"""bench/launch: `choline run` -> first training step, with the environment cached, local provider.

The script prints the wall-clock time of its first training step. Baseline, measured in the
same run: the same script started directly with this Python (interpreter start, imports, first
step). Choline's own overhead = time to first step through choline - the baseline.
Goal: overhead <= 5 s. Median of --repeat runs after one warm-up run (which builds the env).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_S = 5.0
SCRIPT = """\
import time, torch
from torch import nn
model = nn.Linear(64, 10)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
loss = nn.functional.cross_entropy(model(x), y)
loss.backward(); opt.step()
print(f"FIRST_STEP {time.time():.3f}", flush=True)
"""


def first_step(output: str) -> float:
    for line in output.splitlines():
        if line.startswith("FIRST_STEP "):
            return float(line.split()[1])
    raise RuntimeError(f"no first step in the output: {output[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        home, project = Path(d) / "home", Path(d) / "project"
        project.mkdir()
        (project / "train.py").write_text(SCRIPT)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHOLINE_")}
        env["CHOLINE_HOME"] = str(home)
        cli = [sys.executable, "-m", "choline.cli.main"]
        subprocess.run([*cli, "up"], env=env, check=True, capture_output=True, timeout=180)
        try:
            base, through = [], []
            subprocess.run(
                [*cli, "train.py", "--1xcpu"],
                cwd=project,
                env=env,
                check=True,
                capture_output=True,
                text=True,
                timeout=300,
            )  # warm-up: builds and caches the environment
            for _ in range(args.repeat):
                t0 = time.time()
                out = subprocess.run(
                    [sys.executable, "train.py"], cwd=project, capture_output=True, text=True, check=True, timeout=120
                )
                base.append(first_step(out.stdout) - t0)
                t0 = time.time()
                out = subprocess.run(
                    [*cli, "train.py", "--1xcpu", "--no-pull"],
                    cwd=project,
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=300,
                )
                through.append(first_step(out.stdout) - t0)
                print(f"direct {base[-1]:.2f}s, through choline {through[-1]:.2f}s")
        finally:
            subprocess.run([*cli, "down"], env=env, capture_output=True, timeout=180)
    b, t = statistics.median(base), statistics.median(through)
    overhead = t - b
    print(f"first step: direct {b:.2f}s, through choline {t:.2f}s ({t / b:.1f}x): choline's overhead {overhead:.2f}s")
    print(
        json.dumps(
            {
                "name": "launch",
                "first_step_direct_s": round(b, 2),
                "first_step_choline_s": round(t, 2),
                "overhead_s": round(overhead, 2),
                "ratio": round(t / b, 2),
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "goal": f"overhead <= {GOAL_S} s",
                "met": overhead <= GOAL_S,
            }
        )
    )


if __name__ == "__main__":
    main()
