"""The local control channel of a run folder, without torch (so the command line starts fast).

``<run dir>/control/`` holds one JSON file per command (``{"id", "action", "params"}``), written under a
temporary name and renamed, so a reader never sees half a file; the running script reads and deletes them
at its next poll point and appends the outcome to ``<run dir>/controls.jsonl``.

    python -m choline.train.channel RUN_DIR pause|stop|cancel
    python -m choline.train.channel RUN_DIR set lr=3e-4 epochs=+5
    python -m choline.train.channel RUN_DIR log
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from choline_core.errors import UserError

log = logging.getLogger("choline.train")

CONTROL_DIR = "control"
CONTROL_LOG = "controls.jsonl"
ENV_CONTROL_LOG = "CHOLINE_CONTROL_LOG"
ACTIONS = ("pause", "stop", "cancel", "set", "resume")


def send(run_dir: str | os.PathLike[str], action: str, params: Mapping[str, Any] | None = None) -> str:
    """Drop a command into a run folder's local control channel; returns its id.

    The running script picks it up at its next poll point, applies it and records the outcome in
    ``<run dir>/controls.jsonl`` (the file it wrote here is then deleted).
    """
    if action not in ACTIONS:
        raise UserError(f"unknown control action {action!r}", hint=f"use one of {', '.join(ACTIONS)}")
    folder = Path(run_dir) / CONTROL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    cid = f"local-{int(time.time() * 1000):x}-{secrets.token_hex(3)}"
    body = json.dumps({"id": cid, "action": action, "params": dict(params or {})}, allow_nan=False)
    tmp = folder / f".{cid}.tmp"
    tmp.write_text(body)
    os.replace(tmp, folder / f"{time.time_ns():020d}-{cid}.json")
    return cid


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Control records from a ``controls.jsonl`` (or a JSON list); unreadable lines are skipped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError:
        return []
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            data = json.loads(stripped)
        except ValueError:
            log.warning("%s is not valid JSON; no control commands replayed from it", p)
            return []
        return [r for r in data if isinstance(r, dict)]
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _parse_params(items: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or not raw.strip():
            raise UserError(f"{item!r} is not KEY=VALUE", hint="e.g. lr=3e-4 epochs=+5")
        raw = raw.strip()
        value: Any = raw
        if raw[0] not in "+-=*x":
            for convert in (int, float):
                try:
                    value = convert(raw)
                    break
                except ValueError:
                    continue
        params[key.strip()] = value
    return params


def main(argv: list[str] | None = None) -> int:
    """``python -m choline.train.channel RUN_DIR pause|stop|cancel|set KEY=VALUE...|log``"""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m choline.train.channel",
        description="Steer a run that trains on this machine through its run folder's control channel.",
    )
    ap.add_argument("run_dir")
    ap.add_argument("action", choices=["pause", "stop", "cancel", "set", "log"])
    ap.add_argument("params", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "run.json").exists():
        sys.stderr.write(f"error: {run_dir} is not a choline run folder (no run.json)\n")
        return 2
    if args.action == "log":
        for rec in read_records(run_dir / CONTROL_LOG):
            print(json.dumps(rec, sort_keys=True))  # noqa: T201
        return 0
    try:
        params = _parse_params(args.params)
        if args.action == "set" and not params:
            raise UserError("set needs KEY=VALUE pairs", hint="e.g. lr=3e-4 epochs=+5")
        cid = send(run_dir, args.action, params)
    except UserError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    print(cid)  # noqa: T201
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
