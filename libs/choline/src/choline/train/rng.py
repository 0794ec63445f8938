"""Every random number generator a training script leans on: capture, restore, seed.

Covers Python's ``random``, NumPy's legacy global generator (``np.random.*``), torch's CPU generator and
every CUDA device's. Generators a script creates itself (``np.random.default_rng()``, ``torch.Generator()``)
are its own business: put them in the checkpoint state. DataLoader workers are seeded per batch by
``choline.Loader`` instead (see ``data.py``), so their streams need no capture.
"""

from __future__ import annotations

import os
import random
from typing import Any

import torch

from .serialize import _numpy


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) with ``seed``."""
    random.seed(seed)
    np = _numpy()
    if np is not None:
        np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(threads: int | None) -> int:
    """Fix torch's intra-op thread count (CPU results depend on how reductions are split between threads)."""
    if threads is None:
        env = os.environ.get("CHOLINE_NUM_THREADS")
        threads = int(env) if env else torch.get_num_threads()
    threads = max(1, int(threads))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def capture() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    np = _numpy()
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    np = _numpy()
    if np is not None and "numpy" in state:
        s = state["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"], s["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        saved = list(state["cuda"])
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved)
        else:
            for i in range(min(len(saved), torch.cuda.device_count())):
                torch.cuda.set_rng_state(saved[i], i)
