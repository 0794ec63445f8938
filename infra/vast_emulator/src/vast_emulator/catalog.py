"""The offer catalogue and vast.ai's search-query semantics.

A catalogue is a list of offers ("asks") with vast.ai's own field names and units: GPU names as
vast writes them (``RTX 3090``, ``A100 SXM4``, ``H100 SXM``), ``gpu_ram`` and ``cpu_ram`` in MB,
``disk_space`` in GB, ``inet_down``/``inet_up`` in Mbit/s, ``dph_base``/``min_bid`` in $/h,
``storage_cost`` in $/GB/month, ``reliability`` in 0..1, ``geolocation`` as ``"Texas, US"``.
A catalogue file is JSON: ``{"offers": [{...}, ...]}`` (or the bare list); every entry needs
``gpu_name``, ``num_gpus`` and ``dph_base``; ``complete_offer`` fills in the rest.

Queries are what ``POST /api/v0/bundles/`` takes: ``{field: {op: value}}`` with ops ``eq``,
``neq``, ``gt``, ``gte``, ``lt``, ``lte``, ``in``, ``notin`` (``nin``), plus the keys ``order``,
``type``, ``limit``, ``allocated_storage``. Values may come as strings (the CLI's
``parse_query`` sends ``"0.98"``): they are compared as the field's type.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

#: query keys that are not field filters
RESERVED_KEYS = frozenset({"order", "type", "limit", "allocated_storage", "disable_bundling", "select_cols"})
#: field names the API accepts as synonyms
FIELD_ALIASES = {"reliability2": "reliability", "cuda_vers": "cuda_max_good", "dph": "dph_total"}
OPS = frozenset({"eq", "neq", "gt", "gte", "lt", "lte", "in", "notin", "nin"})


class QueryError(ValueError):
    """A query the API would refuse (unknown operator, value of the wrong shape)."""


def _offer(
    ask: int,
    machine: int,
    host: int,
    gpu: str,
    n: int,
    mem_mb: int,
    dph: float,
    *,
    rel: float = 0.995,
    geo: str = "Texas, US",
    down: float = 850.0,
    up: float = 420.0,
    disk: float = 250.0,
    cuda: float = 12.4,
    verified: bool = True,
    ports: int = 64,
    cc: int = 860,
) -> dict[str, Any]:
    return {
        "id": ask,
        "machine_id": machine,
        "host_id": host,
        "gpu_name": gpu,
        "num_gpus": n,
        "gpu_ram": mem_mb,
        "dph_base": dph,
        "min_bid": round(dph * 0.45, 4),
        "reliability": rel,
        "geolocation": geo,
        "inet_down": down,
        "inet_up": up,
        "disk_space": disk,
        "cuda_max_good": cuda,
        "verified": verified,
        "direct_port_count": ports,
        "compute_cap": cc,
    }


def default_offers() -> list[dict[str, Any]]:
    """A small market: a few good offers per common GPU, and offers that each fail one floor.

    Hosts (``machine_id``) are distinct per offer so that excluding a lost host removes exactly
    one offer.
    """
    return [
        _offer(21001, 5001, 101, "RTX 3090", 1, 24576, 0.22, rel=0.996, geo="Texas, US"),
        _offer(21002, 5002, 102, "RTX 3090", 1, 24576, 0.19, rel=0.991, geo="Bavaria, DE", down=610),
        _offer(21003, 5003, 103, "RTX 3090", 1, 24576, 0.25, rel=0.999, geo="Quebec, CA", down=2400),
        _offer(21004, 5004, 104, "RTX 3090", 1, 24576, 0.09, rel=0.90, geo="Ontario, CA"),  # unreliable
        _offer(21005, 5005, 105, "RTX 3090", 1, 24576, 0.10, verified=False, geo="Lviv, UA"),  # unverified
        _offer(21006, 5006, 106, "RTX 3090", 1, 24576, 0.11, ports=0, geo="Ohio, US"),  # no direct SSH
        _offer(21007, 5007, 107, "RTX 3090", 1, 24576, 0.12, down=18, geo="Santiago, CL"),  # slow link
        _offer(21008, 5008, 108, "RTX 3090", 1, 24576, 0.13, cuda=11.4, geo="Hanoi, VN"),  # old driver
        _offer(21009, 5009, 109, "RTX 3090", 1, 24576, 0.14, disk=12, geo="Oregon, US"),  # tiny disk
        _offer(21010, 5010, 110, "RTX 3090", 4, 24576, 0.84, rel=0.993, geo="Texas, US"),
        _offer(21011, 5011, 111, "RTX 3090", 8, 24576, 1.52, rel=0.992, geo="Nevada, US", disk=1200),
        _offer(21020, 5020, 120, "RTX 4090", 1, 24564, 0.36, rel=0.995, geo="Stockholm, SE", cc=890),
        _offer(21021, 5021, 121, "RTX 4090", 2, 24564, 0.70, rel=0.994, geo="Utah, US", cc=890),
        _offer(21030, 5030, 130, "RTX A6000", 1, 49140, 0.45, rel=0.997, geo="Virginia, US"),
        _offer(21040, 5040, 140, "A100 PCIE", 1, 40960, 0.75, rel=0.995, geo="Iowa, US", cc=800),
        _offer(21041, 5041, 141, "A100 SXM4", 1, 81920, 1.10, rel=0.998, geo="Oslo, NO", cc=800, down=5000),
        _offer(21042, 5042, 142, "A100 SXM4", 8, 81920, 8.40, rel=0.998, geo="Oslo, NO", cc=800, disk=4000),
        _offer(21050, 5050, 150, "H100 SXM", 1, 81559, 2.20, rel=0.999, geo="Frankfurt, DE", cc=900, down=9000),
        _offer(21051, 5051, 151, "H100 PCIE", 2, 81559, 3.90, rel=0.996, geo="California, US", cc=900),
        _offer(21060, 5060, 160, "Tesla V100", 1, 16384, 0.16, rel=0.985, geo="Tokyo, JP", cc=700, cuda=12.2),
    ]


def complete_offer(entry: Mapping[str, Any], *, index: int = 0) -> dict[str, Any]:
    """An offer row with every field the SDK, the CLI and choline read, from a catalogue entry.

    ``index`` seeds ids for entries without them. Raises ``ValueError`` naming a missing field.
    """
    for key in ("gpu_name", "num_gpus", "dph_base"):
        if key not in entry:
            raise ValueError(f"catalogue entry {index}: {key!r} is required (have {sorted(entry)})")
    row: dict[str, Any] = dict(entry)
    n = int(row["num_gpus"])
    ask = int(row.setdefault("id", 30000 + index))
    machine = int(row.setdefault("machine_id", 9000 + index))
    row.setdefault("host_id", 700 + index)
    row.setdefault("ask_contract_id", ask)
    row.setdefault("bundle_id", ask)
    row.setdefault("gpu_ram", 24576)
    row.setdefault("gpu_total_ram", int(row["gpu_ram"]) * n)
    row.setdefault("gpu_frac", 1.0)
    row.setdefault("gpu_arch", "nvidia")
    row.setdefault("gpu_display_active", False)
    row.setdefault("gpu_lanes", 16)
    row.setdefault("gpu_mem_bw", 900.0)
    row.setdefault("gpu_max_power", 350.0)
    row.setdefault("gpu_max_temp", 83.0)
    row.setdefault("compute_cap", 860)
    row.setdefault("cuda_max_good", 12.4)
    row.setdefault("driver_version", "550.54.14")
    row.setdefault("bw_nvlink", 0.0)
    row.setdefault("cpu_name", "AMD EPYC 7302 16-Core Processor")
    row.setdefault("cpu_cores", 32)
    row.setdefault("cpu_cores_effective", float(8 * n))
    row.setdefault("cpu_ghz", 3.0)
    row.setdefault("cpu_ram", 32000 * n)
    row.setdefault("cpu_arch", "amd64")
    row.setdefault("disk_space", 250.0)
    row.setdefault("disk_bw", 2500.0)
    row.setdefault("disk_name", "Samsung SSD 980 PRO")
    row.setdefault("inet_down", 800.0)
    row.setdefault("inet_up", 400.0)
    row.setdefault("inet_down_cost", 0.002)
    row.setdefault("inet_up_cost", 0.002)
    row.setdefault("direct_port_count", 64)
    row.setdefault("pci_gen", 4.0)
    row.setdefault("pcie_bw", 24.0)
    row.setdefault("mobo_name", "ROMED8-2T")
    row.setdefault("os_version", "22.04")
    row.setdefault("ubuntu_version", "22.04")
    row.setdefault("has_avx", 1)
    row.setdefault("min_bid", round(float(row["dph_base"]) * 0.45, 4))
    row.setdefault("storage_cost", 0.15)
    row.setdefault("dlperf", round(30.0 * n, 2))
    row.setdefault("total_flops", round(35.0 * n, 2))
    row.setdefault("reliability", 0.99)
    row["reliability2"] = row["reliability"]
    row.setdefault("expected_reliability", row["reliability"])
    row.setdefault("reliability_mult", 1.0)
    verified = bool(row.pop("verified", True))
    row.setdefault("verification", "verified" if verified else "unverified")
    row["verified"] = row["verification"] == "verified"
    row.setdefault("vericode", 0 if row["verified"] else 1)
    row.setdefault("rentable", True)
    row.setdefault("external", False)
    row.setdefault("hosting_type", 0)
    row.setdefault("hostname", f"host{machine}")
    row.setdefault("public_ipaddr", "127.0.0.1")
    row.setdefault("geolocation", "Texas, US")
    row.setdefault("geolocode", 840)
    row.setdefault("static_ip", True)
    row.setdefault("vms_enabled", False)
    row.setdefault("is_vm_deverified", False)
    row.setdefault("duration", 30 * 86400.0)
    row.setdefault("credit_discount_max", 0.2)
    row.setdefault("resource_type", "gpu")
    row.setdefault("logo", "/static/logos/vastai_small2.png")
    row.setdefault("webpage", None)
    row.setdefault("cluster_id", None)
    row.setdefault("datacenter", row["hosting_type"] == 1)
    return row


def priced(row: Mapping[str, Any], *, allocated_storage: float, bid: bool) -> dict[str, Any]:
    """The offer as one search answers it: totals for the storage asked for, bid or on demand.

    ``dph_total`` = GPU price (``dph_base``, or ``min_bid`` for an interruptible search) plus
    ``storage_cost`` ($/GB/month) for ``allocated_storage`` GB, per hour.
    """
    out = dict(row)
    storage = float(row["storage_cost"]) * max(allocated_storage, 0.0) / (30 * 24)
    gpu_price = float(row["min_bid"] if bid else row["dph_base"])
    out["storage_total_cost"] = round(storage, 6)
    out["dph_total"] = round(gpu_price + storage, 6)
    out["is_bid"] = bid
    out["search"] = {"gpuCostPerHour": gpu_price, "diskHour": round(storage, 6), "totalHour": out["dph_total"]}
    out["vram_costperhour"] = round(out["dph_total"] / max(float(row["gpu_total_ram"]) / 1000, 1e-9), 6)
    out["dlperf_per_dphtotal"] = round(float(row["dlperf"]) / max(out["dph_total"], 1e-9), 4)
    out["flops_per_dphtotal"] = round(float(row["total_flops"]) / max(out["dph_total"], 1e-9), 4)
    out["score"] = round(out["dlperf_per_dphtotal"] * float(row["reliability"]), 4)
    return out


def load_catalog(path: Path | str | None) -> list[dict[str, Any]]:
    """Complete offers from a catalogue file, or the default market when ``path`` is None.

    Raises ``ValueError`` (with the file and entry) for a file that is not a catalogue or for
    duplicate offer ids.
    """
    if path is None:
        entries: Iterable[Any] = default_offers()
        where = "the default catalogue"
    else:
        where = str(path)
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the catalogue {where}: {exc}") from None
        found = data.get("offers") if isinstance(data, dict) else data
        if not isinstance(found, list):
            raise ValueError(f"{where}: expected {{'offers': [...]}} or a JSON list of offers")
        entries = found
    rows = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: entry {i} is not an object")
        rows.append(complete_offer(copy.deepcopy(entry), index=i))
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: offer ids must be unique")
    return rows


# --- query semantics ---------------------------------------------------------------------------
def _version_number(text: Any) -> Any:
    """``"535.86.05"`` -> 535086005, as the CLI's ``parse_query`` encodes driver versions."""
    if isinstance(text, str) and text.count(".") == 2:
        try:
            major, minor, patch = (int(p) for p in text.split("."))
        except ValueError:
            return text
        return major * 1_000_000 + minor * 1000 + patch
    return text


def _coerce(want: Any, like: Any) -> Any:
    """``want`` (possibly a string from the CLI) as the type of the row's value ``like``."""
    if isinstance(like, bool):
        if isinstance(want, str):
            return want.strip().lower() in ("true", "1", "yes")
        return bool(want)
    if isinstance(like, (int, float)) and isinstance(want, str):
        try:
            return float(want.strip().strip('"'))
        except ValueError:
            return want
    if isinstance(like, str) and isinstance(want, str):
        return want.strip().strip('"').replace("_", " ") if " " in like else want.strip().strip('"')
    return want


def _candidates(field: str, value: Any) -> list[Any]:
    """The values a row offers for comparison: geolocation matches its country code too."""
    if field == "geolocation" and isinstance(value, str) and "," in value:
        return [value, value.rsplit(",", 1)[1].strip()]
    return [value]


def _compare(value: Any, op: str, want: Any, field: str) -> bool:
    if field == "driver_version":
        value, want = (
            _version_number(value),
            ([_version_number(w) for w in want] if isinstance(want, list) else _version_number(want)),
        )
    if op in ("in", "notin", "nin"):
        if not isinstance(want, (list, tuple)):
            want = [w for w in str(want).strip("[]").split(",") if w.strip()]
        found = any(_coerce(w, v) == v for v in _candidates(field, value) for w in want)
        return found if op == "in" else not found
    if op not in OPS:
        raise QueryError(f"unknown operator {op!r} on {field!r}")
    if op in ("eq", "neq"):
        equal = any(_coerce(want, v) == v for v in _candidates(field, value)) if want is not None else value is None
        return equal if op == "eq" else not equal
    if value is None or want is None:
        return False
    want = _coerce(want, value)
    try:
        if op == "gt":
            return bool(value > want)
        if op == "gte":
            return bool(value >= want)
        if op == "lt":
            return bool(value < want)
        return bool(value <= want)
    except TypeError:
        raise QueryError(f"cannot compare {field!r} ({value!r}) with {want!r}") from None


def matches(row: Mapping[str, Any], query: Mapping[str, Any]) -> bool:
    """Whether ``row`` passes every field filter of ``query`` (reserved keys are skipped).

    A filter on a field the row does not have compares against ``None``. Raises ``QueryError``
    for an operator or value the API would refuse.
    """
    for field, cond in query.items():
        if field in RESERVED_KEYS:
            continue
        name = FIELD_ALIASES.get(field, field)
        conds = cond if isinstance(cond, dict) else {"eq": cond}
        for op, want in conds.items():
            if not _compare(row.get(name), op, want, name):
                return False
    return True


def order_rows(rows: list[dict[str, Any]], order: Any) -> list[dict[str, Any]]:
    """Sort by ``[[field, "asc"|"desc"], ...]`` (vast's form; ``None`` values last)."""
    if not order:
        return rows
    if not isinstance(order, list):
        raise QueryError(f"order must be a list of [field, direction], got {order!r}")
    out = list(rows)
    for item in reversed(order):
        if not isinstance(item, (list, tuple)) or not item:
            raise QueryError(f"order entry {item!r} is not [field, direction]")
        field = FIELD_ALIASES.get(str(item[0]), str(item[0]))
        desc = len(item) > 1 and str(item[1]).lower() == "desc"
        present = [r for r in out if r.get(field) is not None]
        missing = [r for r in out if r.get(field) is None]
        try:
            present.sort(key=lambda r: r[field], reverse=desc)
        except TypeError:
            raise QueryError(f"cannot order by {field!r}") from None
        out = present + missing
    return out
