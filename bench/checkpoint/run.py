"""Checkpoint cost: choline's asynchronous checkpoints against a synchronous ``torch.save`` and none at all.

A CPU model of about 150M parameters (12 square linear layers of 3584: 616 MB of float32 state; plain SGD,
so the optimizer adds no state) trains on random data. Time is cut into segments of ``--interval`` seconds
(60 by default: a checkpoint every minute), interleaved ``none, async, sync, none, async, sync, ...`` so that
load from other processes falls on every mode alike. A checkpointing segment starts with its checkpoint and
then trains until the segment is over; an asynchronous write overlaps that training (a write still running
at the segment's end is waited for and counted).

Figures:
  stall       seconds the training loop is held per checkpoint (async: the copy into reused CPU buffers;
              sync: ``torch.save`` of the model's and optimizer's state dicts to a local file, no fsync)
  overhead    total wall-time overhead of checkpointing every ``interval`` seconds, measured two ways:
              * within the async segment: (stall + the extra time of the steps that overlapped the background
                write, against the median step of the same segment after the write) / segment time;
                insensitive to load from other processes that changes from one minute to the next
              * against the no-checkpoint segments: steps/s(none) / steps/s(mode) - 1; exact on a quiet
                machine, but on a shared one it moves with everybody else's load (the load average is
                printed with it)
  write       wall and CPU seconds of the background write (files, sha256, fsync)

Goal (issue 4): async stall <= 0.1 x the synchronous save's, async overhead <= 2 % (within-segment).
The last line printed is one JSON object.

    python bench/checkpoint/run.py            # the measurement the goal is about (~7 minutes)
    python bench/checkpoint/run.py --quick    # a small model and 4 s segments: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import choline

GOAL = "async stall <= 0.1x synchronous torch.save stall; async total wall-time overhead <= 2% (checkpoint every 60 s)"


def build(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="checkpoint stall and overhead: async vs torch.save vs none")
    ap.add_argument("--quick", action="store_true", help="small model, 4 s segments, one cycle")
    ap.add_argument("--interval", type=float, default=None, help="seconds between checkpoints (default 60)")
    ap.add_argument("--cycles", type=int, default=None, help="none/async/sync rounds (default 2)")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temporary folder)")
    args = ap.parse_args(argv)
    interval = args.interval or (4.0 if args.quick else 60.0)
    cycles = args.cycles or (1 if args.quick else 2)
    width = args.width or (1024 if args.quick else 3584)
    depth = args.depth or (4 if args.quick else 12)
    threads = args.threads or len(os.sched_getaffinity(0))

    work = Path(args.dir or tempfile.mkdtemp(prefix="choline-bench-ckpt-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run = choline.init(run_dir=work / "run", seed=0, threads=threads, keep=1, resume=False)
        writer = run._writer
        assert writer is not None
        model = build(width, depth)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        x = torch.randn(args.batch, width)
        params = sum(p.numel() for p in model.parameters())
        state_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
        load0 = os.getloadavg()[0]
        print(f"model: {params / 1e6:.1f}M parameters, {state_mb:.0f} MB of state; {threads} threads", flush=True)
        print(f"segments of {interval:g} s, {cycles} cycle(s) of none/async/sync; load average {load0:.1f}", flush=True)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            model(x).pow(2).mean().backward()
            opt.step()

        for _ in range(3):  # warm up the allocator and kernels
            step()
        state = {"model": model, "optimizer": opt}
        run.prepare_checkpoint(state)  # the CPU buffers, allocated off the training thread
        run.wait()

        seg: dict[str, list[tuple[int, float]]] = {"none": [], "async": [], "sync": []}
        stalls: dict[str, list[float]] = {"async": [], "sync": []}
        local: list[float] = []
        writes: list[tuple[float, float]] = []
        sync_path = work / "sync.pt"
        for cycle in range(cycles):
            for mode in ("none", "async", "sync"):
                t0 = time.perf_counter()
                if mode == "async":
                    stalls["async"].append(run.checkpoint(state))
                elif mode == "sync":
                    t = time.perf_counter()
                    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, sync_path)
                    stalls["sync"].append(time.perf_counter() - t)
                write_end = None if mode == "async" else t0
                times: list[tuple[float, float]] = []  # (start, duration) of each step
                while time.perf_counter() - t0 < interval:
                    a = time.perf_counter()
                    step()
                    times.append((a, time.perf_counter() - a))
                    run.advance()
                    if write_end is None and not writer.busy:
                        write_end = time.perf_counter()
                if mode == "async":
                    run.wait()  # a write still running at the segment's end is waited for, and counted
                    write_end = write_end or time.perf_counter()
                    if writer.last is not None:
                        writes.append((writer.last.seconds, writer.last.cpu_seconds))
                elapsed = time.perf_counter() - t0
                seg[mode].append((len(times), elapsed))
                line = (
                    f"cycle {cycle + 1} {mode:5s}: {len(times)} steps in {elapsed:.1f} s ({len(times) / elapsed:.3f}/s)"
                )
                if mode in stalls:
                    line += f", stall {stalls[mode][-1]:.3f} s"
                if mode == "async":
                    during = [d for a, d in times if a < write_end]
                    base = median([d for a, d in times if a >= write_end]) or median(during)
                    extra = sum(d - base for d in during)  # what the overlapped steps took beyond the usual
                    local.append((stalls["async"][-1] + max(0.0, extra)) / elapsed)
                    line += (
                        f"; write {writes[-1][0]:.1f} s wall, {writes[-1][1]:.2f} s CPU; {len(during)} steps overlapped"
                        f" it (median {median(during):.3f} s vs {base:.3f} s after): overhead {100 * local[-1]:.2f} %"
                    )
                print(line, flush=True)
                sync_path.unlink(missing_ok=True)
        run.finish()
        load1 = os.getloadavg()[0]

        def rate(mode: str) -> float:
            return sum(n for n, _ in seg[mode]) / sum(t for _, t in seg[mode])

        vs_none = {m: rate("none") / rate(m) - 1 for m in ("async", "sync")}
        stall = {m: median(v) for m, v in stalls.items()}
        ratio = stall["async"] / stall["sync"] if stall["sync"] > 0 else float("inf")
        overhead = median(local)
        print(f"stall per checkpoint: async {stall['async']:.3f} s, sync torch.save {stall['sync']:.3f} s")
        print(f"  ratio {ratio:.3f} (goal <= 0.1)")
        print(f"async overhead within its segments: {100 * overhead:.2f} % (goal <= 2 %)")
        print(
            f"against the no-checkpoint segments: async {100 * vs_none['async']:+.2f} %,"
            f" sync {100 * vs_none['sync']:+.2f} % (load average {load0:.1f} -> {load1:.1f} on {os.cpu_count()} CPUs)"
        )
        result = {
            "name": "checkpoint",
            "quick": args.quick,
            "params_m": round(params / 1e6, 1),
            "state_mb": round(state_mb),
            "threads": threads,
            "interval_s": interval,
            "cycles": cycles,
            "stall_async_s": round(stall["async"], 4),
            "stall_sync_s": round(stall["sync"], 4),
            "stall_ratio": round(ratio, 4),
            "overhead_async": round(overhead, 4),
            "overhead_async_vs_none": round(vs_none["async"], 4),
            "overhead_sync_vs_none": round(vs_none["sync"], 4),
            "async_write_wall_s": round(median([w for w, _ in writes]), 2),
            "async_write_cpu_s": round(median([c for _, c in writes]), 2),
            "steps_per_s_none": round(rate("none"), 4),
            "load_average": [round(load0, 1), round(load1, 1)],
            "goal": GOAL,
            "met": ratio <= 0.1 and overhead <= 0.02,
        }
        print(json.dumps(result))
        return 0
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
