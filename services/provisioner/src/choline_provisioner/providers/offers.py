"""Offers: what a provider could rent us, and how choline picks among them.

``rank_offers(offers, spec, filters)`` is a pure function: it drops the offers that do not
satisfy the GPU spec or a floor, and sorts the rest best first by ``offer_score``:

    score = price per hour / GPUs asked for / reliability

that is the price per *requested* GPU-hour, divided by the chance the machine stays up (the
expected price of a GPU-hour that is actually delivered). Dividing by the GPUs asked for, not
the GPUs on the machine, is deliberate: an 8-GPU machine only beats a 4-GPU one for a
``4x3090`` run when it is cheaper in total, because the run pays for all eight.

A floor the offer cannot answer (bandwidth or disk the provider did not report) excludes the
offer: a floor is a promise, and an unknown is not one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from choline_core.specs import GpuSpec, canonical_model

_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro"}
_FORM_WORDS = {"sxm", "sxm2", "sxm4", "sxm5", "pcie", "nvl", "hbm3", "hbm3e"}


def gpu_model_name(name: str) -> str | None:
    """Choline's canonical model for a GPU name as drivers and providers write it
    (``NVIDIA GeForce RTX 3090``, ``A100-SXM4-80GB``, ``H100 NVL``), or ``None``."""
    direct = canonical_model(name)
    if direct:
        return direct
    words = [w for w in re.split(r"[\s_\-]+", name.lower()) if w]
    words = [w for w in words if w not in _VENDOR_WORDS and w not in _FORM_WORDS and not re.fullmatch(r"\d+gb", w)]
    return canonical_model(" ".join(words)) if words else None


class Offer(BaseModel):
    """One machine a provider would rent out now, at a price.

    ``offer_id`` is the provider's own id (what ``create_instance`` needs); ``host_id`` names the
    physical host so that a run can avoid a host it already lost. ``gpu_name`` is choline's
    canonical model (``RTX 3090``) when the provider's name maps to one, else the provider's
    name; ``None`` for a machine without GPUs. Fields a provider cannot tell are ``None``.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    provider: str
    offer_id: str
    host_id: str
    gpu_name: str | None = None
    gpu_count: int = Field(default=0, ge=0)
    gpu_memory_gb: float = Field(default=0.0, ge=0)
    price_per_hour: float = Field(ge=0)
    reliability: float = Field(default=1.0, ge=0, le=1)
    inet_down_mbps: float | None = None
    inet_up_mbps: float | None = None
    disk_gb: float | None = None
    cpu_cores: int | None = None
    ram_gb: float | None = None
    location: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)

    @property
    def is_cpu(self) -> bool:
        return self.gpu_count == 0 or self.gpu_name is None

    @property
    def price_per_gpu_hour(self) -> float:
        """Price per hour of one of this machine's GPUs (the whole price for a CPU machine)."""
        return self.price_per_hour / self.gpu_count if self.gpu_count else self.price_per_hour

    @property
    def machine(self) -> str:
        """What the machine is, as a spec reads: ``4xRTX_3090-24GB`` or ``1xcpu``."""
        if self.is_cpu:
            return "1xcpu"
        name = (self.gpu_name or "?").replace(" ", "_")
        return f"{self.gpu_count}x{name}-{round(self.gpu_memory_gb)}GB"


class OfferFilters(BaseModel):
    """Floors and limits a run puts on offers; ``None`` means no floor.

    ``exclude_hosts`` holds hosts this run already lost (by ``Offer.host_id``): recovery never
    goes back to one. Providers may apply stricter defaults of their own (vast.ai: reliability
    at least 0.98) before ranking; these filters are applied on top, in ``rank_offers``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_reliability: float | None = Field(default=None, ge=0, le=1)
    min_inet_down_mbps: float | None = Field(default=None, ge=0)
    min_disk_gb: float | None = Field(default=None, ge=0)
    max_price_per_hour: float | None = Field(default=None, ge=0)
    exclude_hosts: frozenset[str] = frozenset()


def offer_rejection(offer: Offer, spec: GpuSpec, filters: OfferFilters | None = None) -> str | None:
    """Why ``offer`` does not qualify for ``spec`` under ``filters``, or ``None`` when it does."""
    f = filters or OfferFilters()
    if not spec.is_cpu:
        if offer.is_cpu:
            return f"has no GPUs, {spec} asked"
        model = gpu_model_name(offer.gpu_name or "") or offer.gpu_name
        if not spec.accepts(model or "", offer.gpu_memory_gb, offer.gpu_count):
            return f"{offer.machine} does not satisfy {spec}"
    if offer.host_id in f.exclude_hosts:
        return f"host {offer.host_id} was lost by this run before"
    if f.max_price_per_hour is not None and offer.price_per_hour > f.max_price_per_hour + 1e-9:
        return f"${offer.price_per_hour:.3f}/h is above the maximum ${f.max_price_per_hour:.3f}/h"
    if f.min_reliability is not None and offer.reliability + 1e-9 < f.min_reliability:
        return f"reliability {offer.reliability:.3f} is below {f.min_reliability:.3f}"
    for label, value, floor in (
        ("download bandwidth (Mbit/s)", offer.inet_down_mbps, f.min_inet_down_mbps),
        ("disk (GB)", offer.disk_gb, f.min_disk_gb),
    ):
        if floor is None:
            continue
        if value is None:
            return f"{label} unknown, floor is {floor:g}"
        if value + 1e-9 < floor:
            return f"{label} {value:g} is below {floor:g}"
    return None


def offer_score(offer: Offer, spec: GpuSpec) -> float:
    """Price per requested GPU-hour divided by reliability: lower is better (see module doc)."""
    per = offer.price_per_hour / max(spec.count, 1)
    return per / max(offer.reliability, 0.01)


def _sort_key(offer: Offer, spec: GpuSpec) -> tuple[float, float, float, float, str, str]:
    down = offer.inet_down_mbps if offer.inet_down_mbps is not None else -1.0
    return (
        round(offer_score(offer, spec), 9),
        -offer.reliability,
        -down,
        offer.price_per_hour,
        offer.provider,
        offer.offer_id,
    )


def rank_offers(offers: Iterable[Offer], spec: GpuSpec, filters: OfferFilters | None = None) -> list[Offer]:
    """The offers that qualify for ``spec`` under ``filters``, best first.

    Ties on score go to the more reliable, then the better-connected offer, then the cheaper
    machine in total; the order is deterministic (offer ids break the last ties).
    """
    ok = [o for o in offers if offer_rejection(o, spec, filters) is None]
    ok.sort(key=lambda o: _sort_key(o, spec))
    return ok


def parse_nvidia_smi(text: str) -> list[tuple[str, float]]:
    """GPUs from ``nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits``.

    Returns ``(name, memory GB)`` per GPU; the name is choline's canonical model when known.
    Lines that do not parse (driver warnings, "No devices were found") are skipped.
    """
    gpus: list[tuple[str, float]] = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 2 or not parts[0]:
            continue
        try:
            mib = float(parts[1].split()[0])
        except (ValueError, IndexError):
            continue
        if not math.isfinite(mib) or mib <= 0:
            continue
        name = gpu_model_name(parts[0]) or parts[0]
        gpus.append((name, round(mib / 1024, 1)))
    return gpus


def offers_from_gpus(
    gpus: list[tuple[str, float]], *, provider: str, offer_id: str, host_id: str, price_per_hour: float, **fields: Any
) -> list[Offer]:
    """One offer per GPU model found on a machine (a CPU offer when there is none)."""
    if not gpus:
        return [Offer(provider=provider, offer_id=offer_id, host_id=host_id, price_per_hour=price_per_hour, **fields)]
    by_model: dict[str, list[float]] = {}
    for name, mem in gpus:
        by_model.setdefault(name, []).append(mem)
    out = []
    for i, (name, mems) in enumerate(sorted(by_model.items())):
        out.append(
            Offer(
                provider=provider,
                offer_id=offer_id if len(by_model) == 1 else f"{offer_id}-{i}",
                host_id=host_id,
                gpu_name=name,
                gpu_count=len(mems),
                gpu_memory_gb=min(mems),
                price_per_hour=price_per_hour,
                **fields,
            )
        )
    return out
