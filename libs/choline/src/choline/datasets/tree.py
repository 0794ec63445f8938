"""What a dataset folder holds: regular files, links that stay inside, empty folders. Anything else is refused.

Paths are relative and ``/``-separated, sorted, so the same tree always gives the same manifest. A link is
kept as a link only when it resolves inside the folder (an absolute one that does is rewritten relative);
a link out of the folder, a device, a FIFO or a socket is refused with the path named, before anything moves.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from choline_core.errors import UserError
from choline_core.pipeline import check_member_path, link_stays_inside

STATE_DIR = ".choline-dataset"  # what ``pull`` keeps in a destination; never part of a dataset


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, '/'-separated
    abspath: str
    size: int
    mode: int
    mtime_ns: int
    ino: int


@dataclass
class Tree:
    root: Path
    files: list[FileEntry] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)  # (path, relative target)
    dirs: list[str] = field(default_factory=list)  # empty folders

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def scan(root: str | os.PathLike[str]) -> Tree:
    """Walk ``root`` (``UserError`` when it is not a readable folder or holds something unsafe)."""
    base = Path(root).expanduser()
    if not base.exists():
        raise UserError(f"{root}: no such folder")
    if not base.is_dir():
        raise UserError(f"{root} is not a folder", hint="a dataset is a folder: put the file in one")
    base = base.resolve()
    tree = Tree(root=base)
    _walk(base, base, "", tree)
    tree.files.sort(key=lambda f: f.path)
    tree.links.sort()
    tree.dirs.sort()
    return tree


def _walk(base: Path, folder: Path, prefix: str, tree: Tree) -> bool:
    """Add ``folder``'s entries; returns whether it holds anything."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except PermissionError as exc:
        raise UserError(f"cannot read {folder}: {exc.strerror}") from None
    found = False
    for entry in entries:
        if not prefix and entry.name == STATE_DIR:
            continue
        rel = f"{prefix}{entry.name}"
        try:
            check_member_path(rel)
        except Exception:
            raise UserError(f"{folder / entry.name}: this name cannot be part of a dataset") from None
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            tree.links.append((rel, _link_target(base, Path(entry.path), rel)))
        elif stat.S_ISDIR(st.st_mode):
            if not _walk(base, Path(entry.path), rel + "/", tree):
                tree.dirs.append(rel)
        elif stat.S_ISREG(st.st_mode):
            if not os.access(entry.path, os.R_OK):
                raise UserError(f"{entry.path} is not readable")
            tree.files.append(
                FileEntry(rel, entry.path, st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_ino)
            )
        else:
            raise UserError(f"{entry.path} is a device, FIFO or socket: a dataset holds files, folders and links")
        found = True
    return found


def _link_target(base: Path, link: Path, rel: str) -> str:
    target = os.readlink(link)
    if os.path.isabs(target):
        resolved = Path(os.path.normpath(target))
        try:
            inside = resolved.relative_to(base)
        except ValueError:
            raise UserError(
                f"{link} links to {target}, outside the dataset",
                hint="copy what it points to into the folder, or remove the link",
            ) from None
        target = os.path.relpath(base / inside, link.parent).replace(os.sep, "/")
    target = target.replace(os.sep, "/")
    if not link_stays_inside(rel, target):
        raise UserError(
            f"{link} links to {target}, outside the dataset",
            hint="copy what it points to into the folder, or remove the link",
        )
    # a relative link can still leave through another link: resolve it for real
    real = Path(os.path.realpath(link))
    if real != base and base not in real.parents and (real.exists() or real.is_symlink()):
        raise UserError(f"{link} resolves to {real}, outside the dataset")
    return target
