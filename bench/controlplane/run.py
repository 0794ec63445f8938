"""bench/controlplane: time from `choline up` to all-healthy, and the whole tree's RSS.

Baseline, measured in the same run: starting the two servers alone (nats-server and
`weed mini`) until they answer, which is the floor choline's own processes add to.
Goal: up <= 3 s and RSS <= 650 MB on a 2-core machine. Median of --repeat runs.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from choline_core.embedded import NatsServer, WeedServer

GOAL_S = 3.0
GOAL_MB = 650.0


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def baseline(tmp: Path) -> tuple[float, float]:
    t0 = time.perf_counter()
    nats = NatsServer(tmp / "nats")
    weed = WeedServer(tmp / "s3", "bench", secrets.token_hex(16))
    nats.start()
    weed.start()
    elapsed = time.perf_counter() - t0
    time.sleep(1.0)
    mem = sum(rss_mb(p) for p in (nats.pid, weed.pid) if p)
    weed.stop()
    nats.stop()
    return elapsed, mem


def one_up(home: Path) -> tuple[float, float]:
    env = dict(os.environ, CHOLINE_HOME=str(home))
    cli = [sys.executable, "-m", "choline.cli.main"]
    t0 = time.perf_counter()
    subprocess.run([*cli, "up"], env=env, check=True, capture_output=True, timeout=120)
    elapsed = time.perf_counter() - t0
    time.sleep(2.0)  # settle: RSS after start-up allocations
    state = json.loads(subprocess.run([*cli, "status", "--json"], env=env, capture_output=True, text=True).stdout)
    mem = sum(rss_mb(p) for p in descendants(state["supervisor_pid"]))
    subprocess.run([*cli, "down"], env=env, check=True, capture_output=True, timeout=120)
    return elapsed, mem


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base_s, base_mb = baseline(tmp / "base")
        ups, mems = [], []
        for i in range(args.repeat):
            # the first `up` of a home also chooses ports and credentials; later ones reuse them
            s, mb = one_up(tmp / "home")
            ups.append(s)
            mems.append(mb)
            print(f"run {i + 1}: up {s:.2f}s, tree RSS {mb:.0f} MB")
    up_s, mem = statistics.median(ups), statistics.median(mems)
    print(f"servers alone (baseline): ready in {base_s:.2f}s, RSS {base_mb:.0f} MB")
    print(
        f"choline up (median of {args.repeat}): {up_s:.2f}s ({up_s / base_s:.1f}x the servers alone), "
        f"RSS {mem:.0f} MB ({mem / base_mb:.1f}x)"
    )
    result = {
        "name": "controlplane",
        "up_s": round(up_s, 2),
        "rss_mb": round(mem),
        "baseline_servers_s": round(base_s, 2),
        "baseline_servers_rss_mb": round(base_mb),
        "up_ratio": round(up_s / base_s, 2),
        "rss_ratio": round(mem / base_mb, 2),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "goal": f"up <= {GOAL_S} s and RSS <= {GOAL_MB:.0f} MB",
        "met": up_s <= GOAL_S and mem <= GOAL_MB,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
