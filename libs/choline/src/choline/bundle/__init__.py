"""Model bundles: ``save_bundle`` writes a trained model as a self-describing folder and tarball (weights in
safetensors, the card, the model's code, declarative preprocessing); ``load_bundle`` rebuilds it.

``archive`` and ``card`` need no torch; ``save_bundle``, ``load_bundle`` and the preprocessing steps load it.
The layout and the card's schema: docs/bundles.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .archive import SUFFIX, extract, pack
from .card import FORMAT, DataCard, Input, Output, check_card, data_card, missing_fields, read_card
from .errors import BundleError

_LAZY = {
    "Bundle": ".bundle",
    "save_bundle": ".bundle",
    "load_bundle": ".bundle",
    "verify_files": ".bundle",
    "Preprocessing": ".preprocess",
    "Step": ".preprocess",
    "cast": ".preprocess",
    "scale": ".preprocess",
    "shift": ".preprocess",
    "clip": ".preprocess",
    "normalize": ".preprocess",
    "reshape": ".preprocess",
    "transpose": ".preprocess",
    "resize": ".preprocess",
}

if TYPE_CHECKING:  # pragma: no cover
    from .bundle import Bundle as Bundle
    from .bundle import load_bundle as load_bundle
    from .bundle import save_bundle as save_bundle
    from .bundle import verify_files as verify_files
    from .preprocess import Preprocessing as Preprocessing
    from .preprocess import Step as Step
    from .preprocess import cast as cast
    from .preprocess import clip as clip
    from .preprocess import normalize as normalize
    from .preprocess import reshape as reshape
    from .preprocess import resize as resize
    from .preprocess import scale as scale
    from .preprocess import shift as shift
    from .preprocess import transpose as transpose


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'choline.bundle' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "FORMAT",
    "SUFFIX",
    "BundleError",
    "DataCard",
    "Input",
    "Output",
    "check_card",
    "data_card",
    "extract",
    "missing_fields",
    "pack",
    "read_card",
    *sorted(_LAZY),
]
