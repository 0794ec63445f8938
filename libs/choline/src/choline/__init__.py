"""choline: train and ship ML models on rented GPUs.

``import choline`` is cheap: the training library (which needs torch) loads on first use of one of its
names (``choline.init``, ``choline.Trainer``, ``choline.Loader`` ...), bundles on first use of
``choline.save_bundle`` / ``choline.load_bundle``, and ``choline.data`` without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
from .datasets.paths import data as data  # choline.data("name"): where a dataset lives (light import)

_TRAIN_NAMES = frozenset(
    {
        "BatchSizeResult",
        "Callback",
        "Cancelled",
        "CheckpointError",
        "Config",
        "Loader",
        "Run",
        "Trainer",
        "accuracy",
        "current_run",
        "find_batch_size",
        "history",
        "init",
        "load_checkpoint",
        "Paused",
        "seed_everything",
    }
)
_BUNDLE_NAMES = frozenset({"Bundle", "DataCard", "Input", "Output", "data_card", "load_bundle", "save_bundle"})

if TYPE_CHECKING:  # pragma: no cover
    from .bundle import Bundle as Bundle
    from .bundle import DataCard as DataCard
    from .bundle import Input as Input
    from .bundle import Output as Output
    from .bundle import data_card as data_card
    from .bundle import load_bundle as load_bundle
    from .bundle import save_bundle as save_bundle
    from .datasets import data as data
    from .train import BatchSizeResult as BatchSizeResult
    from .train import Callback as Callback
    from .train import Cancelled as Cancelled
    from .train import CheckpointError as CheckpointError
    from .train import Config as Config
    from .train import Loader as Loader
    from .train import Paused as Paused
    from .train import Run as Run
    from .train import Trainer as Trainer
    from .train import accuracy as accuracy
    from .train import current_run as current_run
    from .train import find_batch_size as find_batch_size
    from .train import history as history
    from .train import init as init
    from .train import load_checkpoint as load_checkpoint
    from .train import seed_everything as seed_everything


def __getattr__(name: str) -> Any:
    if name in _TRAIN_NAMES:
        value = getattr(importlib.import_module("choline.train"), name)
    elif name in _BUNDLE_NAMES:
        value = getattr(importlib.import_module("choline.bundle"), name)
    elif name == "data":
        value = importlib.import_module("choline.datasets").data
    else:
        raise AttributeError(f"module 'choline' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_TRAIN_NAMES, *_BUNDLE_NAMES, "data"])


__all__ = ["__version__", "data", *sorted(_TRAIN_NAMES | _BUNDLE_NAMES)]
