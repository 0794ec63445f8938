"""Serve a model bundle over HTTP: the card's input schema checks every request, its preprocessing runs
before the model, its labels name the outputs; requests that arrive together share a forward pass.

    python -m choline.serve out/digits.choline-bundle.tar.gz --port 8000
    curl -H 'Content-Type: application/json' -d '{"pixels": [0, 0, 5, ...]}' localhost:8000/predict

The serving process needs torch, the bundle and uvicorn; nothing of the control plane. The deploy service
starts it on this machine, and a rented box's agent starts it there (docs/serving.md, docs/deploy.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .app import ServeConfig as ServeConfig
    from .app import ServingApp as ServingApp
    from .server import serve as serve

_LAZY = {"ServeConfig": ".app", "ServingApp": ".app", "serve": ".server", "main": ".server"}


def __getattr__(name: str) -> Any:
    import importlib

    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'choline.serve' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = sorted(_LAZY)
