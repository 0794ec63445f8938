"""bench/serve: what the serving process costs over a bare forward, and what dynamic batching buys.

For two bundles, the digits network (examples/digits/model.py, 64 pixel values in) and a ~10M-parameter CNN
(bench/serve/cnn.py, 3x32x32 uint8 images in), all measured in this run:

- latency at one client (a persistent HTTP/1.1 connection, one request at a time, batching wait 0):
  p50 and p99 of the round trip minus p50 and p99 of the bare in-process call (``bundle.predict`` on the
  same sample as a tensor: preprocessing + forward), the two alternated sample by sample. The difference is
  everything serving adds: HTTP, JSON, the checks against the card, the hand-off to the inference thread,
  the labelled answer;
- throughput at 64 concurrent clients (64 keep-alive connections from a separate process, each sending
  its next request when the last one is answered) for: the serving process with batching (max batch 64,
  max wait 2 ms), the same process without batching (max batch 1), and a naive FastAPI endpoint written
  the obvious way (bench/serve/naive.py: a pydantic model, a sync route, one forward per request).

For throughput every server runs torch with the same number of intra-op threads (--threads; default: torch's
own, the number of cores, as an endpoint written without thinking about it would). For latency the bare call
and the server both use one thread (--latency-threads): idle OpenMP workers of one process spin on the cores
the other needs, which on two shared cores would measure the spinning, not the serving. The load average when
the run started is printed with the figures: on a shared machine it moves them a lot.

Goal: p50 overhead <= 1 ms for both models, and CNN throughput with batching >= 3x the naive endpoint's.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
GOAL_OVERHEAD_MS = 1.0
GOAL_SPEEDUP = 3.0


# ===================================================================================== bundles
def make_bundles(folder: Path) -> dict[str, dict[str, Any]]:
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    import choline
    from choline.bundle import Input, Output, normalize, scale

    sys.path.insert(0, str(ROOT / "examples" / "digits"))
    sys.path.insert(0, str(HERE))
    import cnn
    from model import build as build_digits

    torch.manual_seed(0)
    x, _ = load_digits(return_X_y=True)
    mean, std = x.mean(0), np.maximum(x.std(0), 1e-3)
    digits = choline.save_bundle(
        build_digits(128, 0.1),
        folder / "digits",
        card={
            "name": "digits",
            "purpose": "Recognise a handwritten digit (0-9) in an 8x8 grayscale image.",
            "inputs": [Input("pixels", "float32", [64], range=(0, 16))],
            "outputs": [Output("digit", kind="logits", shape=[10], labels=[str(i) for i in range(10)])],
        },
        factory=build_digits,
        kwargs={"hidden": 128, "dropout": 0.1},
        preprocessing=[normalize(mean.tolist(), std.tolist())],
    )
    net = cnn.build()
    classes = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    image = choline.save_bundle(
        net,
        folder / "cnn",
        card={
            "name": "cnn",
            "purpose": "Classify a 32x32 colour image into ten classes.",
            "inputs": [Input("image", "uint8", [3, 32, 32], range=(0, 255))],
            "outputs": [Output("label", kind="logits", shape=[10], labels=classes)],
        },
        factory=cnn.build,
        kwargs={"width": 52, "hidden": 1024},
        preprocessing=[scale(1 / 255), normalize([[[0.5]], [[0.5]], [[0.5]]], [[[0.25]], [[0.25]], [[0.25]]])],
    )
    rng = np.random.default_rng(0)
    return {
        "digits": {
            "tarball": digits.tarball,
            "params": sum(p.numel() for p in digits.model.parameters()),
            "samples": [{"pixels": [float(v) for v in row]} for row in x[:64]],
            "path": "/predict",
        },
        "cnn": {
            "tarball": image.tarball,
            "params": sum(p.numel() for p in net.parameters()),
            "samples": [{"image": rng.integers(0, 256, (3, 32, 32)).tolist()} for _ in range(64)],
            "path": "/predict",
        },
    }


# ===================================================================================== servers
class Server:
    def __init__(self, cmd: list[str], ready_file: Path | None, port: int | None = None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT)
        deadline = time.time() + 120
        self.port = port
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            if ready_file is not None and ready_file.exists():
                self.port = json.loads(ready_file.read_text())["port"]
                break
            if ready_file is None and self.port is not None:
                try:
                    c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                    c.request("GET", "/openapi.json")
                    if c.getresponse().status == 200:
                        break
                except OSError:
                    pass
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def choline_server(tarball: Path, folder: Path, tag: str, threads: int, max_batch: int, wait_ms: float) -> Server:
    ready = folder / f"{tag}.ready"
    ready.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "choline.serve", str(tarball), "--port", "0", "--ready-file", str(ready),
           "--max-batch", str(max_batch), "--max-wait-ms", str(wait_ms), "--log-level", "WARNING"]  # fmt: skip
    if threads:
        cmd += ["--threads", str(threads)]
    return Server(cmd, ready)


def naive_server(tarball: Path, threads: int) -> Server:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(HERE / "naive.py"), str(tarball), str(port)]
    return Server(cmd + ([str(threads)] if threads else []), None, port)


# ===================================================================================== measuring
def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def latency_pairs(
    tarball: Path, port: int, path: str, samples: list[dict[str, Any]], n: int, threads: int
) -> tuple[list[float], list[float]]:
    """(bare, http): the in-process call and the HTTP round trip on the same sample, alternated, so that both
    see the same machine (a shared machine's load moves from second to second)."""
    import torch

    import choline

    if threads:
        torch.set_num_threads(threads)
    bundle = choline.load_bundle(tarball)
    name = bundle.inputs[0]["name"]
    dtype = {"float32": torch.float32, "uint8": torch.uint8}[bundle.inputs[0]["dtype"]]
    tensors = [torch.tensor([s[name]], dtype=dtype) for s in samples]
    bodies = [json.dumps(s).encode() for s in samples]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"}
    bare, over_http = [], []
    for i in range(n + 20):
        t = time.perf_counter()
        bundle.predict(tensors[i % len(tensors)])
        t_bare = time.perf_counter() - t
        t = time.perf_counter()
        conn.request("POST", path, body=bodies[i % len(bodies)], headers=headers)
        r = conn.getresponse()
        data = r.read()
        t_http = time.perf_counter() - t
        if r.status != 200:
            raise RuntimeError(f"{r.status}: {data[:300]!r}")
        if i >= 20:
            bare.append(t_bare)
            over_http.append(t_http)
    conn.close()
    return bare, over_http


def load(port: int, path: str, samples_file: Path, seconds: float, clients: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--load", str(port), path, str(samples_file), str(seconds), str(clients)],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


async def _load_main(port: int, path: str, samples_file: Path, seconds: float, clients: int) -> dict[str, Any]:
    samples = json.loads(samples_file.read_text())
    reqs = []
    for s in samples:
        body = json.dumps(s).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
        reqs.append(head + body)
    length = re.compile(rb"content-length:\s*(\d+)", re.I)
    counts = {"ok": 0, "failed": 0}
    warm_until = time.perf_counter() + 1.0
    stop_at = warm_until + seconds

    async def client(k: int) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
        i = k
        while True:
            now = time.perf_counter()
            if now >= stop_at:
                break
            w.write(reqs[i % len(reqs)])
            i += 1
            head = await r.readuntil(b"\r\n\r\n")
            m = length.search(head)
            await r.readexactly(int(m.group(1)) if m else 0)
            if time.perf_counter() > warm_until and time.perf_counter() < stop_at:
                counts["ok" if head[9:12] == b"200" else "failed"] += 1
        w.close()

    await asyncio.gather(*(client(k) for k in range(clients)))
    return {"rps": counts["ok"] / seconds, **counts}


# ===================================================================================== main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads of every server (0: torch's default)"
    )
    ap.add_argument(
        "--latency-threads", type=int, default=1, help="torch threads of the bare call and the server for latency"
    )
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each throughput measurement")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=400, help="requests for the digits latency (CNN: a quarter)")
    ap.add_argument("--load", nargs=5, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load:
        port, path, file, seconds, clients = args.load
        print(json.dumps(asyncio.run(_load_main(int(port), path, Path(file), float(seconds), int(clients)))))
        return

    figures: dict[str, Any] = {
        "name": "serve",
        "threads": args.threads or "default",
        "latency_threads": args.latency_threads,
        "clients": args.clients,
        "cpus": os.cpu_count(),
        "load_average": round(os.getloadavg()[0], 2),
    }
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        bundles = make_bundles(folder)
        for name, b in bundles.items():
            n = args.requests if name == "digits" else max(50, args.requests // 4)
            samples_file = folder / f"{name}.samples.json"
            samples_file.write_text(json.dumps(b["samples"]))
            lat_threads = args.latency_threads
            srv = choline_server(b["tarball"], folder, f"{name}-lat", lat_threads, 32, 0)
            try:
                bare, http_lat = latency_pairs(b["tarball"], srv.port, b["path"], b["samples"], n, lat_threads)  # type: ignore[arg-type]
            finally:
                srv.stop()
            rps = {}
            for variant in ("batched", "unbatched", "naive"):
                if variant == "naive":
                    srv = naive_server(b["tarball"], args.threads)
                else:
                    mb = 64 if variant == "batched" else 1
                    srv = choline_server(b["tarball"], folder, f"{name}-{variant}", args.threads, mb, 2.0)
                try:
                    result = load(srv.port, b["path"], samples_file, args.seconds, args.clients)  # type: ignore[arg-type]
                finally:
                    srv.stop()
                rps[variant] = result["rps"]
                if result["failed"]:
                    figures[f"{name}_{variant}_failed"] = result["failed"]
            f = {
                "params_m": round(b["params"] / 1e6, 2),
                "bare_p50_ms": round(statistics.median(bare) * 1e3, 3),
                "bare_p99_ms": round(pct(bare, 0.99) * 1e3, 3),
                "http_p50_ms": round(statistics.median(http_lat) * 1e3, 3),
                "http_p99_ms": round(pct(http_lat, 0.99) * 1e3, 3),
                "p50_overhead_ms": round((statistics.median(http_lat) - statistics.median(bare)) * 1e3, 3),
                "p99_overhead_ms": round((pct(http_lat, 0.99) - pct(bare, 0.99)) * 1e3, 3),
                "rps_batched": round(rps["batched"], 1),
                "rps_unbatched": round(rps["unbatched"], 1),
                "rps_naive": round(rps["naive"], 1),
                "batched_vs_naive": round(rps["batched"] / max(rps["naive"], 1e-9), 2),
                "batched_vs_unbatched": round(rps["batched"] / max(rps["unbatched"], 1e-9), 2),
            }
            print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in f.items()), flush=True)
            figures.update({f"{name}_{k}": v for k, v in f.items()})
    figures["goal"] = (
        f"p50 overhead <= {GOAL_OVERHEAD_MS} ms for both models; CNN throughput at {args.clients} clients with "
        f"batching >= {GOAL_SPEEDUP}x the naive FastAPI endpoint"
    )
    figures["met"] = bool(
        figures["digits_p50_overhead_ms"] <= GOAL_OVERHEAD_MS
        and figures["cnn_p50_overhead_ms"] <= GOAL_OVERHEAD_MS
        and figures["cnn_batched_vs_naive"] >= GOAL_SPEEDUP
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
