"""bench/metrics: sustained metric ingest agent -> NATS -> database, and chart queries over it.

1. Ingest: the api service runs as its own process (``python -m choline_api``, SQLite, as the
   embedded control plane runs it) on a fresh nats-server. This process plays the agent: it
   publishes ``MetricBatch`` messages of 500 points (the agent's batch) to JetStream, 64 in flight
   (the agent's outbox window), prepared beforehand so that only publishing is timed. Wall time
   runs from the first publish to the api's consumer having stored everything (checked by count);
   the api process's CPU seconds come from /proc. Figures: points/s wall and points per CPU-second
   of the api process, for one key (a step a point) and for 8 keys logged at every step.
2. Chart query over the resulting 1M-point history of one key: ``GET .../series?max_points=1000``
   through HTTP (the rollups) against the plain ``GROUP BY step / width`` over the raw points that
   a chart would otherwise run (same buckets, min/max/count), both median of several runs.

Goals: ingest >= 50k points/s on this 2-core machine; chart query <= 100 ms.
Usage: ``python bench/metrics/run.py [--points 1000000] [--repeat 7]``. The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from choline_core.bus import Bus
from choline_core.embedded import NatsServer, free_port
from choline_core.events import MetricBatch, MetricPoint
from choline_core.subjects import Subjects

GOAL_INGEST = 50_000.0
GOAL_QUERY_MS = 100.0
BATCH = 500
WINDOW = 64
KEY = "train/loss"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def envelopes(run_id: str, attempt: int, n_points: int, *, keys: int = 1, seed: int = 0) -> list[bytes]:
    """Batches as the agent would publish them: one key per step (a loss curve with rare spikes)."""
    rng = random.Random(seed)
    now = datetime.now(timezone.utc)
    out = []
    seq = 0
    step = 0
    while seq < n_points:
        points = []
        for _ in range(min(BATCH, n_points - seq)):
            key = KEY if keys == 1 else f"m{seq % keys}"
            value = 2.0 / (1 + step / 1000) + rng.random() * 0.01
            if rng.random() < 1e-4:
                value *= 50  # a spike the chart must keep
            points.append(MetricPoint(seq=seq, step=step, key=key, value=value, ts=now))
            seq += 1
            if keys == 1 or seq % keys == 0:
                step += 1
        env = MetricBatch(run_id=run_id, attempt=attempt, points=points).envelope()
        out.append(env.to_bytes())
    return out


class Api:
    """The api service as a process, on its own CHOLINE_HOME."""

    def __init__(self, home: Path, nats: NatsServer, prefix: str) -> None:
        self.home = home
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHOLINE_")}
        env.update(
            CHOLINE_HOME=str(home),
            CHOLINE_NATS_URL=nats.url,
            CHOLINE_SUBJECT_PREFIX=prefix,
            CHOLINE_LOG_LEVEL="WARNING",
        )
        self.log = open(home / "api.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "choline_api", "--health-port", str(self.port)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                token_file = home / "secrets" / "token.json"
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200 and token_file.exists():
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the api did not start: {(home / 'api.log').read_text()[-2000:]}")
            time.sleep(0.1)
        self.token = json.loads((home / "secrets" / "token.json").read_text())["api_token"]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def stored(db: Path, run_id: str) -> int:
    with sqlite3.connect(db, timeout=30) as conn:
        return int(conn.execute("SELECT count(*) FROM api_metric_point WHERE run_id = ?", (run_id,)).fetchone()[0])


async def ingest(bus: Bus, api: Api, run_id: str, batches: list[bytes], n_points: int) -> dict[str, float]:
    subject = bus.subjects.run_metrics(run_id)
    db = api.home / "db" / "api.sqlite"
    cpu0 = cpu_seconds(api.proc.pid)
    t0 = time.perf_counter()
    for i in range(0, len(batches), WINDOW):
        await asyncio.gather(*(bus.js.publish(subject, b) for b in batches[i : i + WINDOW]))
    published = time.perf_counter() - t0
    while True:
        done = await asyncio.to_thread(stored, db, run_id)
        if done >= n_points:
            break
        await asyncio.sleep(0.05)
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(api.proc.pid) - cpu0
    return {
        "wall_s": wall,
        "publish_s": published,
        "api_cpu_s": cpu,
        "per_s": n_points / wall,
        "per_cpu_s": n_points / cpu,
    }


def median_ms(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000, help="points in the history (default 1M)")
    parser.add_argument("--repeat", type=int, default=7, help="query repetitions (median)")
    parser.add_argument("--max-points", type=int, default=1000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        root = Path(tmp)
        nats = NatsServer(root / "nats").start()
        prefix = f"bench{random.randrange(1 << 30):x}"
        (root / "home").mkdir()
        api = Api(root / "home", nats, prefix)
        try:
            ingested = asyncio.run(run(args, nats, api, prefix))
            result = charts(args, api, ingested["run_id"], ingested["ingest"], ingested["multi"])
        finally:
            api.stop()
            nats.stop()
    print(json.dumps(result))


async def run(args: argparse.Namespace, nats: NatsServer, api: Api, prefix: str) -> dict[str, Any]:
    bus = await Bus.connect(nats.url, name="bench-agent", subjects=Subjects(prefix))
    await bus.ensure_streams()
    headers = {"Authorization": f"Bearer {api.token}"}
    async with httpx.AsyncClient(base_url=api.url, headers=headers, timeout=60) as http:
        run_id = (await http.post("/v1/runs", json={"script": "train.py", "name": "bench"})).json()["run_id"]
        warm_id = (await http.post("/v1/runs", json={"script": "warm.py"})).json()["run_id"]

    print(f"preparing {args.points} points in batches of {BATCH} ...", flush=True)
    batches = envelopes(run_id, 1, args.points)
    await ingest(bus, api, warm_id, envelopes(warm_id, 1, 20_000, seed=1), 20_000)  # warm up

    ing = await ingest(bus, api, run_id, batches, args.points)
    print(
        f"ingest {args.points} points: {ing['wall_s']:.1f} s wall ({ing['per_s']:,.0f} points/s), "
        f"api CPU {ing['api_cpu_s']:.1f} s ({ing['per_cpu_s']:,.0f} points per CPU-second), "
        f"published in {ing['publish_s']:.1f} s",
        flush=True,
    )
    # a second run with 8 keys (8 points a step), as a real training script logs
    multi_id = run_id + "m"
    n_multi = min(args.points, 400_000)
    multi = await ingest(bus, api, multi_id, envelopes(multi_id, 1, n_multi, keys=8, seed=2), n_multi)
    print(f"ingest {n_multi} points over 8 keys: {multi['per_s']:,.0f} points/s, {multi['per_cpu_s']:,.0f} per CPU-s")
    await bus.close()
    return {"run_id": run_id, "ingest": ing, "multi": multi}


def charts(
    args: argparse.Namespace, api: Api, run_id: str, ing: dict[str, float], multi: dict[str, float]
) -> dict[str, Any]:
    """Chart queries on the ingested history: the rollups over HTTP against a plain GROUP BY."""
    db = api.home / "db" / "api.sqlite"
    client = httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {api.token}"}, timeout=60)
    path = f"/v1/runs/{run_id}/metrics/{KEY}/series"
    first = client.get(path, params={"max_points": args.max_points}).json()
    whole = {"max_points": args.max_points}
    query_ms = median_ms(lambda: client.get(path, params=whole).raise_for_status(), args.repeat)
    zoom = {"max_points": args.max_points, "start": args.points // 3, "end": args.points // 3 + args.points // 10}
    zoom_ms = median_ms(lambda: client.get(path, params=zoom).raise_for_status(), args.repeat)
    client.close()

    width = max(1, args.points // args.max_points)
    conn = sqlite3.connect(db)
    sql = (
        "SELECT step / ? AS b, min(value), max(value), count(*) FROM api_metric_point "
        "WHERE run_id = ? AND key = ? AND superseded = 0 GROUP BY b ORDER BY b"
    )
    baseline_rows = conn.execute(sql, (width, run_id, KEY)).fetchall()
    groupby_ms = median_ms(lambda: conn.execute(sql, (width, run_id, KEY)).fetchall(), max(3, args.repeat // 2))
    conn.close()
    same_spikes = max(r[2] for r in baseline_rows) == max(v for v in first["max"] if v is not None)
    print(
        f"chart query, {args.points} points -> {len(first['step'])} buckets ({first['source']}): "
        f"{query_ms:.1f} ms over HTTP (zoom on 10%: {zoom_ms:.1f} ms); plain GROUP BY: {groupby_ms:.1f} ms "
        f"({groupby_ms / query_ms:.1f}x); same highest spike: {same_spikes}"
    )
    met = ing["per_s"] >= GOAL_INGEST and query_ms <= GOAL_QUERY_MS and same_spikes
    return {
        "name": "metrics",
        "points": args.points,
        "ingest_points_per_s": round(ing["per_s"]),
        "ingest_points_per_api_cpu_s": round(ing["per_cpu_s"]),
        "ingest_api_cpu_s": round(ing["api_cpu_s"], 2),
        "ingest_8keys_points_per_s": round(multi["per_s"]),
        "ingest_8keys_points_per_api_cpu_s": round(multi["per_cpu_s"]),
        "query_ms": round(query_ms, 1),
        "query_zoom_ms": round(zoom_ms, 1),
        "groupby_baseline_ms": round(groupby_ms, 1),
        "query_speedup": round(groupby_ms / query_ms, 1),
        "buckets": len(first["step"]),
        "spikes_kept": same_spikes,
        "goal": f"ingest >= {GOAL_INGEST:.0f} points/s, chart query <= {GOAL_QUERY_MS:.0f} ms on 1M points",
        "met": met,
    }


if __name__ == "__main__":
    main()
