"""Preprocessing as declarative steps: an op name and its parameters, never a pickled callable.

A step works on a batch (``[N, *sample shape]``), in order. In ``card.json`` each step is one object::

    {"op": "scale", "factor": 0.0625}
    {"op": "normalize", "mean": [...], "std": [...]}      mean/std broadcast against one sample
    {"op": "resize", "height": 8, "width": 8, "mode": "bilinear"}

with an optional ``"input"`` naming the input it applies to (default: the first). The ops:

======== ====================================== ==============================================================
op       parameters                             does
======== ====================================== ==============================================================
cast     dtype                                  ``x.to(dtype)``
scale    factor                                 ``x * factor`` (an integer input becomes float32)
shift    offset                                 ``x + offset``
clip     min, max (either may be null)          ``x.clamp(min, max)``
normalize mean, std (numbers or nested lists)   ``(x - mean) / std``, mean/std broadcast against one sample
reshape  shape (per sample; one -1 allowed)     ``x.reshape(N, *shape)``
transpose axes (per sample)                     ``x.permute(0, *[a + 1 for a in axes])``
resize   height, width, mode ("bilinear",       the last two dimensions, ``torch.nn.functional.interpolate``
         "nearest", "bicubic", "area")          (``align_corners=False``, no antialias); 2-D samples too
======== ====================================== ==============================================================
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .errors import BundleError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
RESIZE_MODES = ("bilinear", "nearest", "bicubic", "area")

# op -> (required params, optional params with defaults)
OPS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "cast": (("dtype",), {}),
    "scale": (("factor",), {}),
    "shift": (("offset",), {}),
    "clip": ((), {"min": None, "max": None}),
    "normalize": (("mean", "std"), {}),
    "reshape": (("shape",), {}),
    "transpose": (("axes",), {}),
    "resize": (("height", "width"), {"mode": "bilinear"}),
}


def _finite_tree(value: Any, what: str) -> None:
    if isinstance(value, bool):
        raise BundleError(f"{what} must be a number, not {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(float(value)):
            raise BundleError(f"{what} must be finite, not {value!r}")
        return
    if isinstance(value, (list, tuple)) and value:
        for v in value:
            _finite_tree(v, what)
        return
    raise BundleError(f"{what} must be a number or a (nested) list of numbers, not {value!r}")


def _tolist(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    tolist = getattr(value, "tolist", None)  # NumPy arrays and scalars
    if callable(tolist):
        return tolist()
    if isinstance(value, tuple):
        return [_tolist(v) for v in value]
    if isinstance(value, list):
        return [_tolist(v) for v in value]
    return value


class Step:
    """One preprocessing step. Make them with ``scale(1/16)``, ``normalize(mean, std)`` ..."""

    def __init__(self, op: str, input: str | None = None, **params: Any) -> None:
        if op not in OPS:
            raise BundleError(f"unknown preprocessing op {op!r}", hint=f"known: {', '.join(OPS)}")
        required, optional = OPS[op]
        missing = [p for p in required if p not in params]
        if missing:
            raise BundleError(f"preprocessing {op}: missing {', '.join(missing)}")
        unknown = [p for p in params if p not in required and p not in optional]
        if unknown:
            raise BundleError(f"preprocessing {op}: unknown parameter(s) {', '.join(unknown)}")
        self.op = op
        self.input = input
        self.params: dict[str, Any] = {**optional, **{k: _tolist(v) for k, v in params.items()}}
        self._check()
        self._consts: dict[str, torch.Tensor] = {}

    def _check(self) -> None:
        p, op = self.params, self.op
        if op == "cast" and p["dtype"] not in DTYPES:
            raise BundleError(f"cast: dtype {p['dtype']!r} is not one of {', '.join(DTYPES)}")
        if op in ("scale", "shift"):
            _finite_tree(p["factor" if op == "scale" else "offset"], f"{op}'s value")
        if op == "clip":
            for k in ("min", "max"):
                if p[k] is not None:
                    _finite_tree(p[k], f"clip's {k}")
            if p["min"] is not None and p["max"] is not None and p["min"] > p["max"]:
                raise BundleError("clip: min is above max")
        if op == "normalize":
            _finite_tree(p["mean"], "normalize's mean")
            _finite_tree(p["std"], "normalize's std")
            std = torch.as_tensor(p["std"], dtype=torch.float64)
            if bool((std == 0).any()):
                raise BundleError("normalize: a std of 0 would divide by zero")
        if op in ("reshape", "transpose"):
            key = "shape" if op == "reshape" else "axes"
            v = p[key]
            if not isinstance(v, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in v):
                raise BundleError(f"{op}: {key} must be a list of integers")
            if op == "reshape" and (sum(d == -1 for d in v) > 1 or any(d < -1 or d == 0 for d in v)):
                raise BundleError("reshape: sizes must be positive, with at most one -1")
            if op == "transpose" and sorted(v) != list(range(len(v))):
                raise BundleError(f"transpose: axes {v} are not a permutation of 0..{len(v) - 1}")
        if op == "resize":
            for k in ("height", "width"):
                if not isinstance(p[k], int) or isinstance(p[k], bool) or p[k] < 1:
                    raise BundleError(f"resize: {k} must be a positive integer")
            if p["mode"] not in RESIZE_MODES:
                raise BundleError(f"resize: mode {p['mode']!r} is not one of {', '.join(RESIZE_MODES)}")

    def _const(self, key: str, like: torch.Tensor) -> torch.Tensor:
        dtype = like.dtype if like.is_floating_point() else torch.float32
        cached = self._consts.get(key)
        if cached is None or cached.dtype != dtype or cached.device != like.device:
            cached = torch.as_tensor(self.params[key], dtype=dtype, device=like.device)
            self._consts[key] = cached
        return cached

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p, op = self.params, self.op
        if op == "cast":
            return x.to(DTYPES[p["dtype"]])
        if not x.is_floating_point() and op in ("scale", "shift", "normalize", "resize"):
            x = x.to(torch.float32)
        if op == "scale":
            return x * self._const("factor", x)
        if op == "shift":
            return x + self._const("offset", x)
        if op == "clip":
            return x.clamp(p["min"], p["max"])
        if op == "normalize":
            return (x - self._const("mean", x)) / self._const("std", x)
        if op == "reshape":
            return x.reshape(x.shape[0], *p["shape"])
        if op == "transpose":
            return x.permute(0, *[a + 1 for a in p["axes"]])
        # resize
        two_d = x.dim() == 3
        y = x.unsqueeze(1) if two_d else x
        if y.dim() != 4:
            raise BundleError(f"resize needs samples of 2 or 3 dimensions (H, W or C, H, W), got {list(x.shape[1:])}")
        kwargs: dict[str, Any] = {"size": (p["height"], p["width"]), "mode": p["mode"]}
        if p["mode"] in ("bilinear", "bicubic"):
            kwargs["align_corners"] = False
        y = torch.nn.functional.interpolate(y, **kwargs)
        return y.squeeze(1) if two_d else y

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op, **self.params}
        if self.input is not None:
            out["input"] = self.input
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Step:
        if not isinstance(data, Mapping) or "op" not in data:
            raise BundleError(f"a preprocessing step must be an object with an 'op', not {data!r}")
        params = {k: v for k, v in data.items() if k not in ("op", "input")}
        return cls(str(data["op"]), input=data.get("input"), **params)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.op}({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Step) and self.to_json() == other.to_json()

    def __hash__(self) -> int:  # pragma: no cover
        return hash(repr(self.to_json()))


class Preprocessing:
    """Steps in order; ``pipeline({"pixels": x})`` or ``pipeline(x)`` (one input) returns what the model gets."""

    def __init__(self, steps: Iterable[Step | Mapping[str, Any]] = (), inputs: Sequence[str] = ()) -> None:
        self.steps = [s if isinstance(s, Step) else Step.from_json(s) for s in steps]
        self.inputs = list(inputs)
        for s in self.steps:
            if s.input is not None and self.inputs and s.input not in self.inputs:
                raise BundleError(f"preprocessing {s.op} names input {s.input!r}; the inputs are {self.inputs}")

    def apply(self, name: str | None, x: torch.Tensor) -> torch.Tensor:
        first = self.inputs[0] if self.inputs else None
        for s in self.steps:
            if (s.input or first) == (name or first):
                x = s(x)
        return x

    def __call__(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> Any:
        if isinstance(x, Mapping):
            return {k: self.apply(k, v) for k, v in x.items()}
        return self.apply(None, x)

    def to_json(self) -> list[dict[str, Any]]:
        return [s.to_json() for s in self.steps]

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        return f"Preprocessing({self.steps!r})"


def cast(dtype: str, input: str | None = None) -> Step:
    return Step("cast", input, dtype=dtype)


def scale(factor: float, input: str | None = None) -> Step:
    return Step("scale", input, factor=factor)


def shift(offset: float, input: str | None = None) -> Step:
    return Step("shift", input, offset=offset)


def clip(min: float | None = None, max: float | None = None, input: str | None = None) -> Step:
    return Step("clip", input, min=min, max=max)


def normalize(mean: Any, std: Any, input: str | None = None) -> Step:
    return Step("normalize", input, mean=mean, std=std)


def reshape(*shape: int, input: str | None = None) -> Step:
    return Step("reshape", input, shape=list(shape))


def transpose(*axes: int, input: str | None = None) -> Step:
    return Step("transpose", input, axes=list(axes))


def resize(height: int, width: int, mode: str = "bilinear", input: str | None = None) -> Step:
    return Step("resize", input, height=height, width=width, mode=mode)
