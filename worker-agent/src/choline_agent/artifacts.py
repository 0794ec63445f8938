"""Which files a run brings back: what the script created or changed in its working directory, plus
whatever it announced with ``run.artifact(path)``, within a size limit.

A model bundle travels as one tarball: a file named ``*.choline-bundle.tar.gz``, or a folder holding a
``card.json`` (packed here into ``<folder>.choline-bundle.tar.gz`` in place of its files).
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

BUNDLE_SUFFIX = ".choline-bundle.tar.gz"
CARD = "card.json"
SKIP_DIRS = frozenset(
    {"__pycache__", ".git", ".hg", ".svn", "choline-runs", ".ipynb_checkpoints", ".venv", "venv", ".mypy_cache"}
)
SKIP_SUFFIXES = (".pyc", ".pyo")

Snapshot = dict[str, tuple[int, int]]  # relative path -> (size, mtime_ns)


@dataclass
class Item:
    name: str  # the artifact's path under runs/<run>/artifacts/
    path: Path  # where it is on the box
    size: int
    bundle: bool = False
    announced: bool = False


def snapshot(root: Path) -> Snapshot:
    """Every regular file under ``root`` (links not followed; skipped folders left out)."""
    out: Snapshot = {}
    if not root.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not os.path.islink(os.path.join(dirpath, d))]
        for f in filenames:
            if f.endswith(SKIP_SUFFIXES):
                continue
            p = os.path.join(dirpath, f)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if not os.path.isfile(p) or os.path.islink(p):
                continue
            out[os.path.relpath(p, root).replace(os.sep, "/")] = (st.st_size, st.st_mtime_ns)
    return out


def save_snapshot(snap: Snapshot, path: Path) -> None:
    path.write_text(json.dumps(snap))


def load_snapshot(path: Path) -> Snapshot | None:
    try:
        raw = json.loads(path.read_text())
        return {str(k): (int(v[0]), int(v[1])) for k, v in raw.items()}
    except (OSError, ValueError, TypeError, IndexError):
        return None


def changed(root: Path, before: Snapshot) -> list[str]:
    now = snapshot(root)
    return sorted(k for k, v in now.items() if before.get(k) != v)


def _clean_name(name: str) -> str:
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return "/".join(parts) or "artifact"


def pack_bundle(folder: Path, dest: Path) -> Path:
    """``folder`` as a gzip tarball whose single top-level entry is the folder's name."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    with tarfile.open(tmp, "w:gz") as tf:
        for p in sorted(folder.rglob("*")):
            if p.is_file() and not p.is_symlink():
                tf.add(p, arcname=f"{folder.name}/{p.relative_to(folder).as_posix()}", recursive=False)
    os.replace(tmp, dest)
    return dest


def collect(
    root: Path,
    before: Snapshot,
    announced: list[tuple[Path, str | None]],
    limit_bytes: int,
    scratch: Path,
) -> tuple[list[Item], list[Item]]:
    """(items to upload, items left out by the size limit). Bundles first, then announced, then by size."""
    items: dict[str, Item] = {}
    new_files = changed(root, before)
    bundle_dirs = {str(Path(f).parent.as_posix()) for f in new_files if Path(f).name == CARD}
    for f in new_files:
        p = root / f
        if any(f == d or f.startswith(f"{d}/") for d in bundle_dirs if d != "."):
            continue
        items[f] = Item(f, p, p.stat().st_size, bundle=f.endswith(BUNDLE_SUFFIX))
    for d in sorted(bundle_dirs):
        if d == ".":  # a card.json at the top of the working directory: not a bundle folder
            continue
        tar = pack_bundle(root / d, scratch / f"{d}{BUNDLE_SUFFIX}")
        items[f"{d}{BUNDLE_SUFFIX}"] = Item(f"{d}{BUNDLE_SUFFIX}", tar, tar.stat().st_size, bundle=True)
    for path, name in announced:
        path = path.resolve()
        try:
            rel = path.relative_to(root.resolve()).as_posix()
        except ValueError:
            rel = None
        if path.is_dir():
            if (path / CARD).is_file():
                base = _clean_name(name or rel or path.name)
                tar = pack_bundle(path, scratch / f"{base}{BUNDLE_SUFFIX}")
                items[f"{base}{BUNDLE_SUFFIX}"] = Item(
                    f"{base}{BUNDLE_SUFFIX}", tar, tar.stat().st_size, bundle=True, announced=True
                )
                continue
            for p in sorted(path.rglob("*")):
                if p.is_file() and not p.is_symlink():
                    sub = p.relative_to(path).as_posix()
                    key = _clean_name(f"{name or rel or path.name}/{sub}")
                    items[key] = Item(key, p, p.stat().st_size, announced=True)
        elif path.is_file():
            key = _clean_name(name or rel or path.name)
            items[key] = Item(key, path, path.stat().st_size, bundle=key.endswith(BUNDLE_SUFFIX), announced=True)
    ordered = sorted(items.values(), key=lambda i: (not i.bundle, not i.announced, i.size, i.name))
    chosen: list[Item] = []
    left: list[Item] = []
    total = 0
    for item in ordered:
        if total + item.size <= limit_bytes:
            chosen.append(item)
            total += item.size
        else:
            left.append(item)
    return chosen, left
