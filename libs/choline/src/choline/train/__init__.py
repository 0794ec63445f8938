"""The training library: ``choline.init``, ``choline.Trainer``, ``choline.Loader``, live control, batch-size
search.

Names load on first use (torch with them), so torch-free parts such as the local control channel's command
line (``python -m choline.train.channel``) start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_NAMES = {
    "CheckpointError": ".serialize",
    "load_checkpoint": ".checkpoint",
    "newest_valid": ".checkpoint",
    "Loader": ".data",
    "history": ".metrics",
    "read_points": ".metrics",
    "seed_everything": ".rng",
    "Config": ".run",
    "Run": ".run",
    "current_run": ".run",
    "init": ".run",
    "Callback": ".trainer",
    "Trainer": ".trainer",
    "accuracy": ".trainer",
    "Paused": ".control",
    "Cancelled": ".control",
    "BatchSizeResult": ".batchsize",
    "find_batch_size": ".batchsize",
}

if TYPE_CHECKING:  # pragma: no cover
    from .batchsize import BatchSizeResult as BatchSizeResult
    from .batchsize import find_batch_size as find_batch_size
    from .checkpoint import load_checkpoint as load_checkpoint
    from .checkpoint import newest_valid as newest_valid
    from .control import Cancelled as Cancelled
    from .control import Paused as Paused
    from .data import Loader as Loader
    from .metrics import history as history
    from .metrics import read_points as read_points
    from .rng import seed_everything as seed_everything
    from .run import Config as Config
    from .run import Run as Run
    from .run import current_run as current_run
    from .run import init as init
    from .serialize import CheckpointError as CheckpointError
    from .trainer import Callback as Callback
    from .trainer import Trainer as Trainer
    from .trainer import accuracy as accuracy


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'choline.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_NAMES])


__all__ = sorted(_NAMES)
