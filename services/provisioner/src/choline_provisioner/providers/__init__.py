"""Providers: where boxes come from. The interface is ``base.Provider``; one module each for
``local`` (SSH servers on this machine), ``ssh`` (the user's own machines) and ``vast``.

See docs/providers.md for the contract and setup. Names are imported lazily so that a box
server (``python -m choline_provisioner.providers.localbox``) starts without loading pydantic.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import (
        LABEL_BOX,
        LABEL_INSTALLATION,
        LABEL_RUN,
        Instance,
        InstanceRequest,
        InstanceState,
        InstanceUnavailable,
        Provider,
        SshEndpoint,
        check_labels,
        decode_labels,
        encode_labels,
        labels_match,
    )
    from .offers import Offer, OfferFilters, gpu_model_name, offer_rejection, offer_score, rank_offers
    from .registry import get_provider, provider_names, register_provider, search_offers

_WHERE = {
    **dict.fromkeys(
        [
            "LABEL_BOX",
            "LABEL_INSTALLATION",
            "LABEL_RUN",
            "Instance",
            "InstanceRequest",
            "InstanceState",
            "InstanceUnavailable",
            "Provider",
            "SshEndpoint",
            "check_labels",
            "decode_labels",
            "encode_labels",
            "labels_match",
        ],
        ".base",
    ),
    **dict.fromkeys(
        ["Offer", "OfferFilters", "gpu_model_name", "offer_rejection", "offer_score", "rank_offers"], ".offers"
    ),
    **dict.fromkeys(["get_provider", "provider_names", "register_provider", "search_offers"], ".registry"),
}

__all__ = [
    "LABEL_BOX",
    "LABEL_INSTALLATION",
    "LABEL_RUN",
    "Instance",
    "InstanceRequest",
    "InstanceState",
    "InstanceUnavailable",
    "Offer",
    "OfferFilters",
    "Provider",
    "SshEndpoint",
    "check_labels",
    "decode_labels",
    "encode_labels",
    "get_provider",
    "gpu_model_name",
    "labels_match",
    "offer_rejection",
    "offer_score",
    "provider_names",
    "rank_offers",
    "register_provider",
    "search_offers",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
