"""``choline.data(name)``: where a dataset lives, so a script runs unchanged on a laptop and on a box."""

from __future__ import annotations

import json
import os
from pathlib import Path

from choline_core.agent_protocol import ENV_DATA_DIR
from choline_core.errors import NotFound, UserError

REGISTRY = "local.json"


def home() -> Path:
    return Path(os.environ.get("CHOLINE_HOME") or Path.home() / ".choline").expanduser()


def registry_path() -> Path:
    return home() / "datasets" / REGISTRY


def read_registry() -> dict[str, dict[str, str]]:
    try:
        data = json.loads(registry_path().read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def remember(name: str, path: Path, manifest: str | None = None) -> None:
    """Record where dataset ``name`` lives on this machine (``push`` and ``pull`` call this)."""
    reg = read_registry()
    reg[name] = {"path": str(path.resolve()), **({"manifest": manifest} if manifest else {})}
    target = registry_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{REGISTRY}.{os.getpid()}")
    tmp.write_text(json.dumps(reg, indent=1, sort_keys=True))
    os.replace(tmp, target)


def data(name: str) -> Path:
    """The folder of dataset ``name``.

    On a box (``CHOLINE_DATA_DIR`` set by the agent): ``$CHOLINE_DATA_DIR/<name>``, the synced copy of what
    ``choline run --data PATH:NAME`` pushed. Elsewhere: the folder this machine last pushed as, or pulled to,
    ``name``. Raises ``NotFound`` (a ``CholineError``) naming the datasets it does know.
    """
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise UserError(f"bad dataset name {name!r}")
    box_dir = os.environ.get(ENV_DATA_DIR)
    if box_dir:
        path = Path(box_dir) / name
        if path.exists():
            return path
        have = sorted(p.name for p in Path(box_dir).iterdir()) if Path(box_dir).is_dir() else []
        raise NotFound(
            f"no dataset {name!r} on this box (have: {', '.join(have) or 'none'})",
            hint=f"ship it with: choline run --data PATH:{name} ...",
        )
    entry = read_registry().get(name)
    if entry and Path(entry["path"]).is_dir():
        return Path(entry["path"])
    known = sorted(read_registry())
    raise NotFound(
        f"no local folder for dataset {name!r} (known here: {', '.join(known) or 'none'})",
        hint=f"'choline data push PATH {name}' or 'choline data pull {name} DEST' records one",
    )
