"""A small Trainer run for the live-control process tests: prints ``step N`` after each optimizer step (and
sleeps ``--sleep`` seconds there, so a test can steer it while it runs); writes the final weights to
``--out``. ``--idle`` instead tracks a loader and then sleeps without ever polling (SIGTERM's grace)."""

from __future__ import annotations

import argparse
import time

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import choline


class Steps(choline.Callback):
    def __init__(self, sleep: float) -> None:
        self.sleep = sleep

    def on_step_end(self, trainer, step, logs):
        print(f"step {step}", flush=True)
        time.sleep(self.sleep)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--idle", action="store_true")
    args = ap.parse_args()
    run = choline.init(run_dir=args.run_dir, seed=3, threads=1)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 6, generator=g)
    data = TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long())
    if args.idle:
        run.loader(data, batch_size=8)
        print("idle", flush=True)
        time.sleep(120)
        return
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = choline.Trainer(
        model,
        opt,
        nn.functional.cross_entropy,
        DataLoader(data, batch_size=8, shuffle=True),
        epochs=3,
        scheduler=torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7),
        checkpoint_every=4,
        callbacks=[Steps(args.sleep)],
    )
    trainer.fit()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)
    print(f"done {run.step}", flush=True)


if __name__ == "__main__":
    main()
