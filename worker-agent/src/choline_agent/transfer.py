"""Moving bytes through presigned URLs (the box never holds S3 keys), and unpacking code bundles safely.

Synchronous (``urllib`` from the standard library); the agent calls these through ``asyncio.to_thread``.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

CHUNK = 1 << 20


class TransferError(Exception):
    """An upload or download failed; ``retryable`` says whether trying again (with fresh URLs) may help."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


def _http_error(what: str, exc: Exception) -> TransferError:
    if isinstance(exc, urllib.error.HTTPError):
        body = b""
        try:
            body = exc.read()[:300]
        except Exception:
            pass
        code = exc.code
        detail = body.decode(errors="replace").replace("\n", " ")
        # 403: an expired or wrong-endpoint signature (re-presign); 404 on a GET: gone; 5xx: S3 trouble
        return TransferError(f"{what}: HTTP {code} {detail}".strip(), retryable=code != 404)
    return TransferError(f"{what}: {type(exc).__name__}: {exc}")


def put_file(url: str, path: str | os.PathLike[str], *, timeout: float = 60.0) -> int:
    """PUT a file's bytes to a presigned URL; returns the size. ``FileNotFoundError`` passes through."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        req = urllib.request.Request(
            url,
            data=fh if size else b"",
            method="PUT",
            headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                resp.read()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise _http_error(f"upload of {Path(path).name}", exc) from None
    return size


def get_file(
    url: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    size: int | None = None,
    timeout: float = 60.0,
) -> str:
    """Download to ``dest`` atomically, checking ``size`` and ``sha256`` when given; returns the sha256."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    h = hashlib.sha256()
    n = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as fh:
            while chunk := resp.read(CHUNK):
                fh.write(chunk)
                h.update(chunk)
                n += len(chunk)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise _http_error(f"download of {dest.name}", exc) from None
    digest = h.hexdigest()
    if size is not None and n != size:
        tmp.unlink(missing_ok=True)
        raise TransferError(f"download of {dest.name}: {n} bytes, expected {size}")
    if sha256 is not None and digest != sha256:
        tmp.unlink(missing_ok=True)
        raise TransferError(f"download of {dest.name}: sha256 {digest[:12]}… does not match {sha256[:12]}…")
    os.replace(tmp, dest)
    return digest


# ------------------------------------------------------------------------------------ code bundles
class UnsafeArchive(ValueError):
    """A code bundle with an absolute path, a '..' component, a link out of the folder or a device file."""


_FILTER_ERROR: type[Exception] = getattr(tarfile, "FilterError", UnsafeArchive)


def _inside(name: str) -> bool:
    norm = posixpath.normpath(name)
    return not (norm.startswith(("/", "../")) or norm == "..")


def check_members(tf: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Every member, or ``UnsafeArchive`` naming the first that would land (or point) outside."""
    members = tf.getmembers()
    for m in members:
        name = m.name
        if not name or name.startswith("/") or "\\" in name or (len(name) > 1 and name[1] == ":"):
            raise UnsafeArchive(f"{name!r} is an absolute path")
        if ".." in name.split("/") or not _inside(name):
            raise UnsafeArchive(f"{name!r} climbs out of the folder")
        if m.issym():
            target = m.linkname
            if target.startswith("/") or not _inside(posixpath.join(posixpath.dirname(name), target)):
                raise UnsafeArchive(f"{name!r} links to {target!r}, outside the folder")
        elif m.islnk():
            if m.linkname.startswith("/") or not _inside(m.linkname):
                raise UnsafeArchive(f"{name!r} is a hard link to {m.linkname!r}, outside the folder")
        elif not (m.isfile() or m.isdir()):
            raise UnsafeArchive(f"{name!r} is a device, FIFO or other special file")
    return members


def safe_extract(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> int:
    """Unpack a ``.tar.gz`` code bundle into ``dest`` after checking every member; returns the file count."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tf:
            members = check_members(tf)
            if hasattr(tarfile, "data_filter"):  # 3.10.12+/3.11.4+: a second, physical check
                tf.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - older interpreters
                tf.extractall(dest, members=members)
    except _FILTER_ERROR as exc:
        raise UnsafeArchive(str(exc)) from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UnsafeArchive(f"not a readable .tar.gz: {exc}") from None
    return sum(1 for m in members if m.isfile())
