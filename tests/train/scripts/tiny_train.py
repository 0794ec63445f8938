"""A tiny, randomness-heavy training script for the kill/resume tests.

Its dataset draws from Python's, NumPy's and torch's generators in every ``__getitem__`` (so DataLoader
workers' seeding matters), the model has dropout, the loop accumulates gradients, clips them and steps a
scheduler. Kill points: ``CHOLINE_FAULTS="test.step.<N>=crash"`` (after optimizer step N, global) or
``test.epoch_end.<E>=crash`` (after epoch E's checkpoint was asked for); the library's own barriers too
(``checkpoint.before_manifest=crash@2``: die while writing the second checkpoint of this process).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, TensorDataset

import choline
from choline_core import faults


class NoisyDataset(Dataset):
    def __init__(self, n: int, dim: int) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, dim, generator=g)
        self.y = (self.x[:, 0] + self.x[:, 1] > 0).long() + (self.x[:, 2] > 1).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        noise = torch.randn(self.x.shape[1]) * 0.1
        scale = 1.0 + 0.05 * random.random() + 0.05 * float(np.random.rand())
        return self.x[i] * scale + noise, self.y[i]


class KillPoints(choline.Callback):
    """Named moments for ``CHOLINE_FAULTS``. ``durable``: let the checkpoint in flight finish first (on every
    rank), so a test knows which checkpoint the next start must resume from; otherwise the kill may land in
    the middle of a background write."""

    def __init__(self, durable: bool) -> None:
        self.durable = durable

    def _point(self, trainer, name: str) -> None:
        if self.durable:
            trainer.run.wait()
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
        faults.barrier(name)

    def on_step_end(self, trainer, step, logs):
        self._point(trainer, f"test.step.{step}")

    def on_epoch_end(self, trainer, epoch, logs):
        self._point(trainer, f"test.epoch_end.{epoch}")


class CountingCallback(choline.Callback):
    """Checkpointed state of a callback: the number of steps it has seen."""

    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, trainer, step, logs):
        self.steps += 1

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = int(state["steps"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--checkpoint-every", default="4")
    ap.add_argument("--accumulate", type=int, default=2)
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--out", required=True)
    ap.add_argument("--durable-kills", action="store_true")
    args = ap.parse_args()

    run = choline.init(config={"lr": 0.01}, run_dir=args.run_dir, seed=7, threads=1)
    if run.world_size > 1:
        choline.seed_everything(7 + 1000 * run.rank)  # ranks draw different numbers: each rank's RNG must come back
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 3))
    opt = torch.optim.Adam(model.parameters(), lr=run.config.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)
    train = DataLoader(NoisyDataset(args.samples, 12), batch_size=8, shuffle=True, num_workers=args.workers)
    g = torch.Generator().manual_seed(99)
    vx = torch.randn(40, 12, generator=g)
    val = DataLoader(TensorDataset(vx, (vx[:, 0] + vx[:, 1] > 0).long()), batch_size=16)
    every = args.checkpoint_every if args.checkpoint_every == "epoch" else int(args.checkpoint_every)
    counter = CountingCallback()
    trainer = choline.Trainer(
        model,
        opt,
        torch.nn.functional.cross_entropy,
        train,
        val,
        epochs=args.epochs,
        scheduler=sched,
        metrics=["accuracy"],
        grad_clip=1.0,
        accumulate=args.accumulate,
        checkpoint_every=every,
        callbacks=[KillPoints(args.durable_kills), counter],
    )
    trainer.fit()
    if run.is_main:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)
        Path(args.out + ".json").write_text(json.dumps({"callback_steps": counter.steps, "step": run.step}))


if __name__ == "__main__":
    main()
