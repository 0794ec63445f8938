"""Handwritten digits with choline: a small network on scikit-learn's bundled digits (8x8 images, no
download), trained with ``choline.Trainer``. Deterministic, resumable, a few seconds on a laptop CPU.

    python examples/digits/train.py                      # 10 epochs, a checkpoint after each
    python examples/digits/train.py --epochs 3 --lr 0.01
    python examples/digits/train.py --checkpoint-every 5 # a checkpoint every 5 optimizer steps

Run it again with the same ``--run-dir`` (or ``$CHOLINE_RUN_DIR``) after a crash and it carries on from
its newest checkpoint; under ``choline run`` the worker-agent sets all of that up. At the end it saves a
model bundle (``<run dir>/digits`` and ``digits.choline-bundle.tar.gz`` beside it: weights, card, the
network's code from ``model.py``, the normalization as a preprocessing step). The last line printed is a
JSON summary (run folder, steps, final metrics, bundle).

Live control (``choline set RUN lr=... epochs=+N``, or ``python -m choline.train.channel RUN_DIR ...``):
the default OneCycleLR schedule takes learning-rate changes but refuses a change of length; with
``--scheduler step`` the number of epochs can change too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import choline
from choline.bundle import DataCard, Input, Output, normalize

sys.path.insert(0, str(Path(__file__).resolve().parent))  # model.py beside this file, however it is started
from model import build


def load(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 1797 images (64 pixel values 0..16) and labels, and a fixed 80/20 split (train, val indices)."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    return x, y, order[:cut], order[cut:]


def stats(x: torch.Tensor, train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel mean and std of the training part (a constant pixel gets std 1e-3)."""
    return x[train].mean(0), x[train].std(0).clamp_min(1e-3)


def datasets(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Both parts, standardized with the training part's statistics (the bundle's preprocessing step)."""
    x, y, train, val = load(seed)
    mean, std = stats(x, train)
    x = (x - mean) / std
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def model() -> nn.Module:
    return build()


def bundle_options(seed: int, path: str) -> dict[str, object]:
    """What the bundle says about the model: its card, how to rebuild it, its preprocessing."""
    x, y, train, val = load(seed)
    mean, std = stats(x, train)
    raw = x.numpy().tobytes() + y.numpy().tobytes()
    card = {
        "name": "digits",
        "purpose": "Recognise a handwritten digit (0-9) in an 8x8 grayscale image.",
        "description": "A small fully connected network trained with choline on scikit-learn's digits.",
        "inputs": [
            Input(
                "pixels",
                "float32",
                [64],
                range=(0, 16),
                description="the 8x8 image row by row, 64 values from 0 (white) to 16 (black), as in sklearn",
            )
        ],
        "outputs": [Output("digit", kind="logits", shape=[10], labels=[str(i) for i in range(10)])],
        "data": [
            DataCard(
                name="sklearn digits",
                examples=len(x),
                size_bytes=len(raw),
                manifest="sha256:" + hashlib.sha256(raw).hexdigest(),
                source="sklearn.datasets.load_digits (UCI optical recognition of handwritten digits)",
                splits={"train": len(train), "validation": len(val)},
            )
        ],
    }
    return {
        "path": path,
        "card": card,
        "factory": build,
        "kwargs": {"hidden": 128, "dropout": 0.1},
        "preprocessing": [normalize(mean, std)],
    }


def every(value: str) -> str | int:
    if value == "epoch":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("use 'epoch' or a number of steps") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--checkpoint-every", type=every, default="epoch", help="'epoch' or a number of steps")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it)")
    ap.add_argument("--run-dir", default=None, help="default: $CHOLINE_RUN_DIR or ./choline-runs/<run id>")
    ap.add_argument("--scheduler", choices=["onecycle", "step"], default="onecycle")
    ap.add_argument("--bundle", default=None, help="where to save the model bundle (default: <run dir>/digits)")
    args = ap.parse_args(argv)
    if args.epochs < 0 or args.lr <= 0 or args.batch_size < 1:
        ap.error("--epochs must be >= 0, --lr > 0, --batch-size >= 1")

    config = {k: v for k, v in vars(args).items() if k not in ("run_dir", "bundle")}
    run = choline.init(
        config=config, name="digits", project="examples", run_dir=args.run_dir, seed=args.seed, threads=args.threads
    )
    train, val = datasets(args.seed)
    net = model()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * -(-len(train) // args.batch_size)
    sched: torch.optim.lr_scheduler.LRScheduler
    if args.scheduler == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=max(1, steps))
    else:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, steps // 3), gamma=0.3)
    trainer = choline.Trainer(
        net,
        opt,
        nn.functional.cross_entropy,
        DataLoader(train, batch_size=args.batch_size, shuffle=True, num_workers=args.workers),
        DataLoader(val, batch_size=256),
        epochs=args.epochs,
        scheduler=sched,
        metrics=["accuracy"],
        grad_clip=1.0,
        checkpoint_every=args.checkpoint_every,
        bundle=bundle_options(args.seed, args.bundle or str(run.dir / "digits")),
    )
    summary = trainer.fit()
    if run.is_main:
        weights = run.dir / "model.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(weights))
        run.artifact(weights)
        run.wait()
        bundle = str(trainer.bundle.tarball) if trainer.bundle is not None else None
        print(
            json.dumps({"run_dir": str(run.dir), "step": run.step, "attempt": run.attempt, "bundle": bundle, **summary})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
