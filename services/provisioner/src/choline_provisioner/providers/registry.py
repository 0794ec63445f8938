"""Providers by name: ``get_provider("local")``, ``search_offers("ssh", "1xcpu")``.

Built-in providers are imported lazily from ``BUILTIN`` (``vast`` appears as soon as
``providers/vast.py`` defines ``VastProvider``); others join with ``register_provider``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from choline_core.errors import BadUsage, NotFound
from choline_core.specs import GpuSpec, parse_gpu_spec

from .base import Provider
from .offers import Offer, OfferFilters

BUILTIN: dict[str, str] = {
    "local": "choline_provisioner.providers.local:LocalProvider",
    "ssh": "choline_provisioner.providers.ssh:SshProvider",
    "vast": "choline_provisioner.providers.vast:VastProvider",
}
_registered: dict[str, Callable[..., Provider]] = {}


def register_provider(name: str, factory: Callable[..., Provider]) -> None:
    """Make ``get_provider(name, **options)`` call ``factory(**options)``."""
    _registered[name] = factory


def provider_names() -> list[str]:
    """Every name ``get_provider`` knows (a built-in whose module is missing included)."""
    return sorted(set(BUILTIN) | set(_registered))


def _factory(name: str) -> Callable[..., Provider]:
    if name in _registered:
        return _registered[name]
    target = BUILTIN.get(name)
    if target is None:
        raise BadUsage(f"unknown provider {name!r}", hint=f"choose one of: {', '.join(provider_names())}")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise NotFound(f"provider {name!r} is not available in this installation") from None
        raise
    factory: Callable[..., Provider] = getattr(module, attr)
    return factory


def get_provider(name: str, **options: Any) -> Provider:
    """A new provider instance; ``options`` go to its constructor (``home=``, ...).

    The caller owns it and calls ``await provider.close()`` when done.
    """
    return _factory(name)(**options)


async def search_offers(
    provider_name: str, spec: GpuSpec | str, filters: OfferFilters | None = None, **options: Any
) -> list[Offer]:
    """Ranked offers from one provider for a spec (``"4x3090"`` or a ``GpuSpec``).

    What ``choline offers SPEC [--provider P] [--json]`` shows. An empty list means nothing
    qualifies; ``BadSpec`` for a spec that does not parse, ``BadUsage`` for an unknown provider.
    """
    gpu_spec = parse_gpu_spec(spec) if isinstance(spec, str) else spec
    provider = get_provider(provider_name, **options)
    try:
        return await provider.search_offers(gpu_spec, filters)
    finally:
        await provider.close()
