"""The model card: what a model is for, what it takes and gives, how it was made. ``card.json``.

The user states the purpose, the inputs (required), the outputs and the training data; ``save_bundle`` adds
the rest (preprocessing, model code, weights, run, metrics, code digest, environment, files). A card
without its purpose or a complete input schema is refused with a message listing every missing field.
See docs/bundles.md for the schema.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import BundleError

FORMAT = "choline-bundle/1"
INPUT_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
OUTPUT_KINDS = ("logits", "probabilities", "values", "class", "embedding")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")


@dataclass
class Input:
    """One named input. ``shape`` is one sample's (no batch dimension); ``None`` for a length that varies.
    ``range``: ``(min, max)``, inclusive, either may be ``None``."""

    name: str
    dtype: str
    shape: Sequence[int | None]
    range: tuple[float | None, float | None] | None = None
    description: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.range is not None:
            out["range"] = list(self.range)
        if self.description:
            out["description"] = self.description
        return out


@dataclass
class Output:
    """One named output. ``labels``: what each index of the last dimension means (classes)."""

    name: str
    kind: str = "values"
    shape: Sequence[int | None] | None = None
    dtype: str = "float32"
    labels: Sequence[str] | None = None
    description: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "dtype": self.dtype}
        if self.shape is not None:
            out["shape"] = list(self.shape)
        if self.labels is not None:
            out["labels"] = [str(x) for x in self.labels]
        if self.description:
            out["description"] = self.description
        return out


@dataclass
class DataCard:
    """A dataset the model was trained on."""

    name: str
    examples: int | None = None
    size_bytes: int | None = None
    manifest: str | None = None  # the choline dataset manifest's digest, or a content digest of the folder
    source: str | None = None  # where it comes from (a URL, a package, a citation)
    description: str | None = None
    splits: dict[str, int] = field(default_factory=dict)  # {"train": 1437, "validation": 360}

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, {})}


def data_card(
    name: str, path: str | os.PathLike[str] | None = None, *, examples: int | None = None, **more: Any
) -> DataCard:
    """A ``DataCard`` for the dataset in ``path`` (default: ``choline.data(name)`` when it knows the name):
    its size, and its manifest digest (a choline dataset's, else a sha256 over its files' names and bytes)."""
    folder: Path | None = Path(path) if path is not None else None
    manifest = more.pop("manifest", None)
    if folder is None:
        try:
            from choline.datasets import data

            folder = data(name)
        except Exception:
            folder = None
    size = None
    if folder is not None and folder.exists():
        files = sorted(p for p in folder.rglob("*") if p.is_file() and ".choline-dataset" not in p.parts)
        size = sum(p.stat().st_size for p in files)
        if manifest is None:
            manifest = _dataset_manifest(folder) or _folder_digest(folder, files)
    return DataCard(name=name, examples=examples, size_bytes=size, manifest=manifest, **more)


def _dataset_manifest(folder: Path) -> str | None:
    try:
        state = json.loads((folder / ".choline-dataset" / "state.json").read_text())
        value = state.get("manifest")
        return str(value) if value else None
    except (OSError, ValueError, AttributeError):
        return None


def _folder_digest(folder: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        with open(p, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


# ===================================================================================== the card
def _as_json(obj: Any) -> Any:
    to_json = getattr(obj, "to_json", None)
    return to_json() if callable(to_json) else obj


def build_card(card: Mapping[str, Any] | Any) -> dict[str, Any]:
    """The user's part of a card (a dict, or an object with the same attributes) as JSON values."""
    if not isinstance(card, Mapping):
        card = {k: getattr(card, k) for k in dir(card) if not k.startswith("_") and not callable(getattr(card, k))}
    out = dict(card)
    for key in ("inputs", "outputs", "data"):
        if out.get(key) is not None:
            out[key] = [_as_json(x) for x in out[key]]
    return out


def missing_fields(card: Mapping[str, Any]) -> list[str]:
    """What a card lacks or gets wrong, as ``field: reason`` strings (empty: complete enough to save)."""
    problems: list[str] = []
    purpose = card.get("purpose")
    if not isinstance(purpose, str) or not purpose.strip():
        problems.append("purpose")
    inputs = card.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        problems.append("inputs")
    else:
        names = set()
        for i, spec in enumerate(inputs):
            where = f"inputs[{i}]"
            if not isinstance(spec, Mapping):
                problems.append(f"{where}: not an object")
                continue
            name = spec.get("name")
            if not isinstance(name, str) or not _NAME.match(name):
                problems.append(f"{where}.name")
            elif name in names:
                problems.append(f"{where}.name: {name!r} twice")
            else:
                names.add(name)
            if spec.get("dtype") not in INPUT_DTYPES:
                problems.append(f"{where}.dtype" + (f": {spec['dtype']!r} is not one of {', '.join(INPUT_DTYPES)}"
                                                      if spec.get("dtype") is not None else ""))  # fmt: skip
            shape = spec.get("shape")
            if not isinstance(shape, (list, tuple)) or not all(
                d is None or (isinstance(d, int) and not isinstance(d, bool) and d > 0) for d in shape
            ):
                problems.append(f"{where}.shape" + (": positive sizes or null" if shape is not None else ""))
            rng = spec.get("range")
            if rng is not None:
                ok = isinstance(rng, (list, tuple)) and len(rng) == 2
                ok = ok and all(v is None or (isinstance(v, (int, float)) and math.isfinite(v)) for v in rng)
                if ok and rng[0] is not None and rng[1] is not None and rng[0] > rng[1]:
                    ok = False
                if not ok:
                    problems.append(f"{where}.range: [min, max] with min <= max")
    for i, spec in enumerate(card.get("outputs") or []):
        where = f"outputs[{i}]"
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            problems.append(f"{where}.name")
            continue
        if spec.get("kind", "values") not in OUTPUT_KINDS:
            problems.append(f"{where}.kind: one of {', '.join(OUTPUT_KINDS)}")
        labels, shape = spec.get("labels"), spec.get("shape")
        if labels is not None and shape and shape[-1] is not None and len(labels) != shape[-1]:
            problems.append(f"{where}.labels: {len(labels)} labels for a last dimension of {shape[-1]}")
    for i, d in enumerate(card.get("data") or []):
        if not isinstance(d, Mapping) or not isinstance(d.get("name"), str) or not d.get("name"):
            problems.append(f"data[{i}].name")
    return problems


def check_card(card: Mapping[str, Any]) -> None:
    problems = missing_fields(card)
    if problems:
        raise BundleError(
            "the model card is missing or gets wrong: " + "; ".join(problems),
            hint="a card needs purpose='what the model is for' and inputs=[Input(name, dtype, shape, range)]",
            detail={"missing": problems},
        )


def read_card(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / "card.json"
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{folder} is not a bundle: no card.json") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(card, dict):
        raise BundleError(f"{path} must hold a JSON object")
    fmt = str(card.get("format", ""))
    if not fmt.startswith("choline-bundle/"):
        raise BundleError(f"{path}: format {fmt!r} is not a choline bundle")
    if fmt.split("/", 1)[1].split(".")[0] != FORMAT.split("/")[1]:
        raise BundleError(f"{path}: format {fmt!r} is newer than this library reads ({FORMAT})")
    return card
