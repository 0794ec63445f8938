"""How CLI commands print: tables for people, ``--json`` for programs, one-line errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str, sort_keys=False) + "\n")


def table(rows: Iterable[Mapping[str, Any]], columns: Sequence[str], *, empty: str = "(none)") -> None:
    rows = list(rows)
    if not rows:
        print(empty)
        return
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def error(message: str) -> None:
    """One line on stderr."""
    sys.stderr.write(f"choline: error: {' '.join(message.split())}\n")
