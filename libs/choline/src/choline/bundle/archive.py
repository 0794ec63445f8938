"""Bundle tarballs: written reproducibly, unpacked safely.

``pack`` writes ``<folder>.choline-bundle.tar.gz`` whose single top-level entry is the folder's name, with
regular files only, in sorted order, owner 0, modes 0644, mtime 0 and a gzip header without a time: the same
folder always gives the same bytes (so the tarball's digest names the model).

``extract`` refuses, before writing anything: absolute names, ``..`` components, backslashes and NUL bytes,
links (symbolic or hard), devices and FIFOs, more than one top-level entry, more than ``max_files`` entries
or ``max_bytes`` of content (a decompression bomb), duplicate names. It writes each file itself
(``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0644) under a temporary folder renamed into place at the end, so
nothing from the archive chooses a permission, an owner or a place outside the destination.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from .errors import BundleError

SUFFIX = ".choline-bundle.tar.gz"
MAX_FILES = 100_000
MAX_BYTES = 64 * 1024**3
_CHUNK = 1 << 20


def tarball_path(folder: str | os.PathLike[str]) -> Path:
    p = Path(folder)
    return p.with_name(p.name + SUFFIX)


def pack(folder: str | os.PathLike[str], dest: str | os.PathLike[str] | None = None) -> Path:
    """Pack ``folder`` (regular files only; links are refused) into a reproducible gzip tarball."""
    src = Path(folder)
    out = Path(dest) if dest is not None else tarball_path(src)
    files: list[Path] = []
    for p in sorted(src.rglob("*")):
        if p.is_symlink():
            raise BundleError(f"{p} is a link: a bundle holds regular files only")
        if p.is_file():
            files.append(p)
    tmp = out.with_name(f".{out.name}.part{os.getpid()}")
    with (
        open(tmp, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tf,
    ):
        for p in files:
            info = tarfile.TarInfo(f"{src.name}/{p.relative_to(src).as_posix()}")
            info.size = p.stat().st_size
            info.mode = 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(p, "rb") as fh:
                tf.addfile(info, fh)
    os.replace(tmp, out)
    return out


def _check_name(name: str) -> PurePosixPath:
    if not name or "\x00" in name or "\\" in name:
        raise BundleError(f"unsafe name in the archive: {name!r}")
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith("/"):
        raise BundleError(f"unsafe name in the archive: {name!r} is absolute")
    parts = [p for p in path.parts if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise BundleError(f"unsafe name in the archive: {name!r} goes up ('..')")
    if not parts:
        raise BundleError(f"unsafe name in the archive: {name!r}")
    return PurePosixPath(*parts)


def extract(
    archive: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    max_files: int = MAX_FILES,
    max_bytes: int = MAX_BYTES,
) -> Path:
    """Unpack a bundle tarball into ``dest``; returns the bundle folder (``dest/<top-level name>``)."""
    dest_dir = Path(dest)
    try:
        tf = tarfile.open(archive, mode="r:*")  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, OSError) as exc:
        raise BundleError(f"{archive} is not a readable tar archive: {exc}") from None
    with tf:
        members: list[tuple[tarfile.TarInfo, PurePosixPath]] = []
        total = 0
        seen: set[PurePosixPath] = set()
        tops: set[str] = set()
        try:
            for m in tf:
                if len(members) >= max_files:
                    raise BundleError(f"{archive} has more than {max_files} entries")
                rel = _check_name(m.name)
                if m.issym() or m.islnk():
                    raise BundleError(f"{archive}: {m.name!r} is a link (links are refused)")
                if not (m.isfile() or m.isdir()):
                    raise BundleError(f"{archive}: {m.name!r} is not a regular file or folder")
                if m.isfile():
                    if rel in seen:
                        raise BundleError(f"{archive}: {m.name!r} appears twice")
                    seen.add(rel)
                    total += m.size
                    if total > max_bytes:
                        raise BundleError(f"{archive} unpacks to more than {max_bytes} bytes")
                tops.add(rel.parts[0])
                members.append((m, rel))
        except tarfile.TarError as exc:
            raise BundleError(f"{archive} is damaged: {exc}") from None
        if len(tops) != 1:
            raise BundleError(f"{archive} must hold one top-level folder, it holds {sorted(tops) or 'nothing'}")
        top = tops.pop()
        if any(len(rel.parts) == 1 and m.isfile() for m, rel in members):
            raise BundleError(f"{archive}: {top!r} must be a folder")
        final = dest_dir / top
        if final.exists():
            raise BundleError(f"{final} already exists", hint="extract into an empty folder")
        dest_dir.mkdir(parents=True, exist_ok=True)
        staging = dest_dir / f".{top}.extracting{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            for m, rel in members:
                target = staging.joinpath(*rel.parts[1:]) if len(rel.parts) > 1 else staging
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(m)
                if src is None:  # pragma: no cover - regular files always have data
                    raise BundleError(f"{archive}: cannot read {m.name!r}")
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                fd = os.open(target, flags, 0o644)
                with os.fdopen(fd, "wb") as out, contextlib.closing(src):
                    left = m.size
                    while left > 0:
                        block = src.read(min(_CHUNK, left))
                        if not block:
                            raise BundleError(f"{archive}: {m.name!r} is truncated")
                        out.write(block)
                        left -= len(block)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final


def is_tarball(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return p.is_file() and tarfile.is_tarfile(p)
