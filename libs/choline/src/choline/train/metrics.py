"""Reading a local run folder's metrics as one history.

Attempt *i* owns the steps ``(r_i, r_{i+1}]``, where ``r_{i+1}`` is the step attempt *i+1* resumed from
(0 when it started from scratch). Points of an earlier attempt beyond a later attempt's resume step are
superseded: still in ``metrics.jsonl`` for audit, left out of ``history()``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from choline_core.agent_protocol import decode_value

from .run import METRICS_FILE, RUN_FILE


def read_points(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every point in ``metrics.jsonl`` (a torn last line, from a killed process, is skipped)."""
    points = []
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                p = json.loads(line)
            except ValueError:
                continue
            p["value"] = decode_value(p.get("value"), p.get("raw"))
            points.append(p)
    return points


def resume_steps(run_dir: str | Path) -> dict[int, int]:
    """``{attempt: step it resumed from}`` from ``run.json``."""
    try:
        meta = json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {int(a["attempt"]): int(a.get("resumed_from_step") or 0) for a in meta.get("attempts", [])}


def history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's points with superseded ones left out, in (step, seq-of-attempt) order."""
    points = read_points(run_dir)
    starts = resume_steps(run_dir)
    out = []
    for p in points:
        a, s = int(p.get("attempt") or 1), int(p["step"])
        if any(b > a and r < s for b, r in starts.items()):
            continue
        out.append(p)
    out.sort(key=lambda p: (p["step"], p.get("attempt") or 1, p["seq"]))
    return out
