"""bench/controlplane: time from `choline up` to all-healthy, and the whole tree's memory.

Memory is reported two ways: the sum of each process's RSS (the goal's measure; a page shared by
several processes counts once per process) and the sum of PSS (each shared page split between the
processes that share it: what the tree really holds in RAM).
Baselines, measured in the same run: starting the two servers alone (nats-server and `weed mini`)
until they answer, which is the floor choline's own processes add to; and `choline up` with
CHOLINE_SUPERVISOR_FORK=0 (each service a fresh interpreter, as before the supervisor forked them).
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


def _proc_mb(path: str, field: str) -> float:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def rss_mb(pid: int) -> float:
    return _proc_mb(f"/proc/{pid}/status", "VmRSS:")


def pss_mb(pid: int) -> float:
    return _proc_mb(f"/proc/{pid}/smaps_rollup", "Pss:")


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


def one_up(home: Path, fork: bool = True) -> tuple[float, float, float]:
    env = dict(os.environ, CHOLINE_HOME=str(home), CHOLINE_SUPERVISOR_FORK="1" if fork else "0")
    cli = [sys.executable, "-m", "choline.cli.main"]
    t0 = time.perf_counter()
    subprocess.run([*cli, "up"], env=env, check=True, capture_output=True, timeout=120)
    elapsed = time.perf_counter() - t0
    time.sleep(2.0)  # settle: memory after start-up allocations
    state = json.loads(subprocess.run([*cli, "status", "--json"], env=env, capture_output=True, text=True).stdout)
    pids = descendants(state["supervisor_pid"])
    rss, pss = sum(rss_mb(p) for p in pids), sum(pss_mb(p) for p in pids)
    subprocess.run([*cli, "down"], env=env, check=True, capture_output=True, timeout=120)
    return elapsed, rss, pss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base_s, base_mb = baseline(tmp / "base")
        runs: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
        one_up(tmp / "home")  # the first `up` of a home also chooses ports and credentials; not counted
        for i in range(args.repeat):
            for fork in (True, False):  # alternated, so that the machine's load falls on both alike
                s, rss, pss = one_up(tmp / "home", fork)
                runs[fork].append((s, rss, pss))
                how = "forked services" if fork else "spawned services"
                print(f"run {i + 1}, {how}: up {s:.2f}s, tree RSS {rss:.0f} MB, PSS {pss:.0f} MB")
    med = {k: [statistics.median(x[j] for x in v) for j in range(3)] for k, v in runs.items()}
    up_s, mem, pss = med[True]
    sp_s, sp_mem, sp_pss = med[False]
    print(f"servers alone (baseline): ready in {base_s:.2f}s, RSS {base_mb:.0f} MB")
    print(
        f"choline up (median of {args.repeat}): {up_s:.2f}s ({up_s / base_s:.1f}x the servers alone), "
        f"RSS {mem:.0f} MB ({mem / base_mb:.1f}x), PSS {pss:.0f} MB"
    )
    print(f"with spawned services (CHOLINE_SUPERVISOR_FORK=0): {sp_s:.2f}s, RSS {sp_mem:.0f} MB, PSS {sp_pss:.0f} MB")
    result = {
        "name": "controlplane",
        "up_s": round(up_s, 2),
        "rss_mb": round(mem),
        "pss_mb": round(pss),
        "spawned_up_s": round(sp_s, 2),
        "spawned_rss_mb": round(sp_mem),
        "spawned_pss_mb": round(sp_pss),
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
