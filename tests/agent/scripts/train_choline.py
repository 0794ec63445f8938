"""A tiny training script on choline's library: a weight vector that gains 1 per step, a loss per step,
a checkpoint every ``--every`` steps. Resumed, it carries on from the restored step."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import choline
from choline_core.agent_protocol import EXIT_PAUSED

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=12)
ap.add_argument("--every", type=int, default=3)
ap.add_argument("--sleep", type=float, default=0.0)
ap.add_argument("--pause-at", type=int, default=0)
args = ap.parse_args()

run = choline.init(config={"lr": 0.1}, seed=0, threads=1)
state = {"w": torch.zeros(3)}
run.restore(state)
print(f"start at step {run.step}", flush=True)
while run.step < args.steps:
    run.advance()
    state["w"] += 1
    run.log({"loss": 1.0 / run.step, "val_loss": float(run.step)})
    print(f"step {run.step}", flush=True)
    if run.step % args.every == 0:
        run.checkpoint(state)
    if args.sleep:
        time.sleep(args.sleep)
    if run.step == args.pause_at:
        run.checkpoint(state, reason="pause", wait=True)
        run.finish()
        print("paused", flush=True)
        sys.exit(EXIT_PAUSED)
run.wait()
Path("result.txt").write_text(f"{state['w'].tolist()}\n")
Path("notes").mkdir(exist_ok=True)
Path("notes/extra.txt").write_text("announced\n")
run.artifact("notes/extra.txt")
run.finish()
print("done", flush=True)
