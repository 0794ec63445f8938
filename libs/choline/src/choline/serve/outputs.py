"""The model's outputs as JSON, named and labelled by the card.

Each prediction is an object ``{output name: {...}}``. ``value`` is always there: the model's tensor for that
sample as nested lists (float32 values printed exactly, so a client can compare them with an in-process
run). For ``logits``, ``probabilities`` and ``class`` outputs with labels, ``label`` and ``index`` name the
top class (per position for outputs with more dimensions) and ``score`` is its probability.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch


class OutputError(Exception):
    """The model returned something the card's outputs cannot describe (a bug in the bundle, not the request)."""


def _labelled(index: Any, labels: Sequence[str]) -> Any:
    if isinstance(index, list):
        return [_labelled(i, labels) for i in index]
    return labels[index] if 0 <= index < len(labels) else str(index)


class Outputs:
    """``encode(result, n)``: the model's output for a batch of ``n`` as ``n`` JSON documents (bytes)."""

    def __init__(self, card: Mapping[str, Any]) -> None:
        self.specs: list[dict[str, Any]] = [dict(o) for o in card.get("outputs") or []] or [
            {"name": "output", "kind": "values"}
        ]

    def tensors(self, result: Any) -> list[tuple[dict[str, Any], torch.Tensor]]:
        if isinstance(result, torch.Tensor):
            return [(self.specs[0], result)]
        if isinstance(result, Mapping):
            named = {s["name"]: s for s in self.specs}
            return [(named.get(str(k), {"name": str(k), "kind": "values"}), v) for k, v in result.items()]
        if isinstance(result, (list, tuple)):
            out = []
            for i, v in enumerate(result):
                spec = self.specs[i] if i < len(self.specs) else {"name": f"output_{i}", "kind": "values"}
                out.append((spec, v))
            return out
        raise OutputError(f"the model returned {type(result).__name__}, not tensors")

    def encode(self, result: Any, n: int) -> list[bytes]:
        columns: list[tuple[str, list[dict[str, Any]]]] = []
        for spec, t in self.tensors(result):
            if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != n:
                raise OutputError(f"output {spec['name']!r} is not a batch of {n}")
            t = t.detach().cpu()
            if t.dtype in (torch.bfloat16, torch.float16):
                t = t.float()
            per: list[dict[str, Any]] = [{"value": v} for v in t.tolist()]
            labels, kind = spec.get("labels"), spec.get("kind")
            if labels and kind in ("logits", "probabilities") and t.dim() >= 2 and t.shape[-1] == len(labels):
                probs = torch.softmax(t.float(), dim=-1) if kind == "logits" else t.float()
                score, index = probs.max(dim=-1)
                for d, i, s in zip(per, index.tolist(), score.tolist(), strict=True):
                    d["label"] = _labelled(i, labels)
                    d["index"] = i
                    d["score"] = s
            elif labels and kind == "class" and not t.is_floating_point():
                for d in per:
                    d["label"] = _labelled(d["value"], labels)
                    d["index"] = d["value"]
            columns.append((str(spec["name"]), per))
        dumps = json.dumps
        return [
            dumps({name: per[i] for name, per in columns}, separators=(",", ":"), allow_nan=True).encode()
            for i in range(n)
        ]
