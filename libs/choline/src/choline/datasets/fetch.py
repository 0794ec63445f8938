"""``materialize``: a dataset version becomes a folder, moving only the chunks that are not on disk yet.

1. **Plan.** A file that the folder's previous version (``.choline-dataset/``) already holds unchanged (same
   chunks, same size and mtime as recorded) is left alone. Every other file is built in a staging area
   (``.choline-dataset/parts-<digest>/``) and renamed into place only when all its chunks are in and checked.
2. **Local chunks.** Chunks that an older version on this disk holds (this folder's, or ``sources``) are
   copied from there, each checked against its sha256; one that does not match is fetched instead.
3. **Ranged GETs.** The rest are grouped by pack, neighbours merged into ranges of up to 8 MiB, and fetched
   by ``workers`` threads over keep-alive connections to presigned URLs. Each chunk's sha256 is checked as it
   arrives; a mismatch (a corrupted transfer) fetches the range again, up to 3 times.
4. Links and empty folders are made, entries of the previous version that are gone are removed, and the
   state (manifest, each file's size and mtime) is written last.

Resumable: each chunk written is journaled (``partial-<digest>.log``); run again after a kill, only the
chunks not journaled move. Paths come from a validated manifest (``DatasetManifest.validate_tree``) and every
write goes through ``_target``, which refuses to follow a link, so nothing lands outside ``dest``.

Standard library only: the agent runs this on the box.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import shutil
import threading
import time
import urllib.parse
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from choline_core import faults
from choline_core.errors import StorageError, UserError
from choline_core.pipeline import DatasetManifest

from .progress import Progress
from .tree import STATE_DIR

Urls = Callable[[list[str]], dict[str, str]]  # pack digests -> presigned GET URLs (fresh ones on each call)

MAX_RANGE = 8 * 1024 * 1024
MAX_GAP = 256 * 1024
URL_BATCH = 500
TRIES = 3


@dataclass
class FetchResult:
    manifest: str
    files: int
    size: int
    fetched_bytes: int = 0  # over the network (ranges, gaps included)
    local_bytes: int = 0  # copied from chunks already on this disk
    skipped_bytes: int = 0  # files already in place
    resumed_bytes: int = 0  # written before an interruption
    requests: int = 0
    refetched: int = 0  # ranges fetched again after a hash mismatch or a broken transfer
    seconds: float = 0.0


@dataclass
class _Range:
    pack: str
    start: int
    end: int  # exclusive
    chunks: list[tuple[str, int, int]] = field(default_factory=list)  # (sha, offset, length)


def read_state(folder: Path) -> tuple[dict[str, object], DatasetManifest | None]:
    """The recorded state of a materialised folder and its manifest (``({}, None)`` when there is none)."""
    sd = folder / STATE_DIR
    try:
        state = json.loads((sd / "state.json").read_text())
        manifest = DatasetManifest.from_bytes((sd / "manifest.gz").read_bytes(), str(state["manifest"]))
    except (OSError, ValueError, KeyError, TypeError, Exception):
        return {}, None
    return (state, manifest) if isinstance(state, dict) else ({}, None)


class _Fetch:
    def __init__(
        self, manifest: DatasetManifest, digest: str, dest: Path, urls: Urls, workers: int, progress: Progress
    ) -> None:
        self.m = manifest
        self.digest = digest
        self.dest = dest
        self.urls_fn = urls
        self.workers = workers
        self.progress = progress
        self.sd = dest / STATE_DIR
        self.parts = self.sd / f"parts-{digest[:16]}"
        self.journal_path = self.sd / f"partial-{digest[:16]}.log"
        self.result = FetchResult(manifest=digest, files=len(manifest.files), size=manifest.size)
        self.lock = threading.Lock()
        self.remaining: dict[int, int] = {}  # file index -> chunk writes still to do
        self.need: dict[str, list[tuple[int, int]]] = defaultdict(list)  # sha -> [(file index, file offset)]
        self.where: dict[str, tuple[int, int, int]] = {}  # sha -> (pack index, offset, length)
        self.urls: dict[str, str] = {}
        self.local = threading.local()
        self.errors: list[BaseException] = []
        self.journal: Any = None
        self.defer = False  # while copying local chunks, no file is renamed over a source still being read

    # ------------------------------------------------------------------ plan
    def plan(self, sources: Iterable[Path]) -> dict[str, tuple[Path, int, int]]:
        """Decide what to write; returns chunks available on this disk: sha -> (file, offset, length)."""
        self.sd.mkdir(parents=True, exist_ok=True)
        self.parts.mkdir(exist_ok=True)
        old_state, old = read_state(self.dest)
        old_files = {f.path: f for f in old.files} if old is not None else {}
        raw_files = old_state.get("files")
        recorded: dict[str, Any] = raw_files if isinstance(raw_files, dict) else {}
        done: set[tuple[int, int]] = set()
        if self.journal_path.exists():
            for line in self.journal_path.read_text().splitlines():
                idx, _, off = line.partition("\t")
                if idx.isdigit() and off.isdigit() and (self.parts / idx).exists():
                    done.add((int(idx), int(off)))
        for i, f in enumerate(self.m.files):
            target = self.dest / f.path
            prev = old_files.get(f.path)
            if prev is not None and prev.chunks == f.chunks and _unchanged(target, recorded.get(f.path)):
                self.result.skipped_bytes += f.size
                self.progress.advance(f.size)
                if prev.mode != f.mode:
                    os.chmod(target, f.mode)
                continue
            part = self.parts / str(i)
            if not part.exists():
                fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                os.close(fd)
            todo = 0
            offset = 0
            for pack, poff, length, sha in f.chunks:
                if (i, offset) in done:
                    self.result.resumed_bytes += length
                    self.progress.advance(length)
                else:
                    self.need[sha].append((i, offset))
                    self.where.setdefault(sha, (pack, poff, length))
                    todo += 1
                offset += length
            self.remaining[i] = todo
        self.journal = open(self.journal_path, "a")  # noqa: SIM115 - closed in run()
        local: dict[str, tuple[Path, int, int]] = {}
        for folder, manifest in [(self.dest, old), *((s, read_state(s)[1]) for s in sources)]:
            if manifest is None:
                continue
            for f in manifest.files:
                offset = 0
                for _, _, length, sha in f.chunks:
                    if sha in self.need and sha not in local:
                        local[sha] = (folder / f.path, offset, length)
                    offset += length
        return local

    # ------------------------------------------------------------------ writing
    def write(self, sha: str, data: bytes) -> None:
        """Write a checked chunk everywhere this version needs it; finish files that are complete."""
        finished: list[int] = []
        for idx, offset in self.need.get(sha, ()):
            fd = os.open(self.parts / str(idx), os.O_WRONLY | os.O_NOFOLLOW)
            try:
                os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
            with self.lock:
                assert self.journal is not None
                self.journal.write(f"{idx}\t{offset}\n")
                self.remaining[idx] -= 1
                if self.remaining[idx] == 0:
                    finished.append(idx)
            self.progress.advance(len(data))
        with self.lock:
            assert self.journal is not None
            self.journal.flush()
        if not self.defer:
            for idx in finished:
                self.finish_file(idx)

    def finish_file(self, idx: int) -> None:
        f = self.m.files[idx]
        part = self.parts / str(idx)
        if part.stat().st_size != f.size:
            raise StorageError(f"{f.path}: built {part.stat().st_size} bytes, expected {f.size}")
        os.chmod(part, f.mode)
        target = _target(self.dest, f.path)
        os.replace(part, target)

    # ------------------------------------------------------------------ local chunks
    def copy_local(self, local: dict[str, tuple[Path, int, int]]) -> None:
        self.defer = True
        try:
            self._copy_local(local)
        finally:
            self.defer = False

    def _copy_local(self, local: dict[str, tuple[Path, int, int]]) -> None:
        for sha, (path, offset, length) in local.items():
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    data = os.pread(fd, length, offset)
                finally:
                    os.close(fd)
            except OSError:
                continue
            if len(data) != length or hashlib.sha256(data).hexdigest() != sha:
                continue  # changed on disk: fetch it instead
            n = len(self.need[sha])
            self.write(sha, data)
            self.result.local_bytes += length * n
            del self.need[sha]

    # ------------------------------------------------------------------ ranged GETs
    def ranges(self) -> list[_Range]:
        by_pack: dict[int, list[tuple[int, int, str]]] = defaultdict(list)
        for sha in self.need:
            pack, offset, length = self.where[sha]
            by_pack[pack].append((offset, length, sha))
        out: list[_Range] = []
        for pack, items in by_pack.items():
            items.sort()
            cur: _Range | None = None
            for offset, length, sha in items:
                end = offset + length
                if cur is None or offset - cur.end > MAX_GAP or end - cur.start > MAX_RANGE:
                    cur = _Range(self.m.packs[pack], offset, end)
                    out.append(cur)
                cur.end = max(cur.end, end)
                cur.chunks.append((sha, offset, length))
        return out

    def refresh_urls(self, packs: list[str]) -> None:
        for i in range(0, len(packs), URL_BATCH):
            got = self.urls_fn(packs[i : i + URL_BATCH])
            missing = set(packs[i : i + URL_BATCH]) - set(got)
            if missing:
                raise StorageError(f"no download URL for pack {sorted(missing)[0][:12]}")
            with self.lock:
                self.urls.update(got)

    def fetch_range(self, r: _Range) -> None:
        if self.errors:
            return
        try:
            for attempt in range(TRIES):
                try:
                    data = self.get(self.urls[r.pack], r.start, r.end)
                except _Expired:
                    self.refresh_urls([r.pack])
                    data = None
                except (OSError, http.client.HTTPException, StorageError) as exc:
                    if attempt == TRIES - 1:
                        raise StorageError(f"fetching pack {r.pack[:12]} failed: {exc}") from None
                    data = None
                if data is not None:
                    bad = [
                        sha
                        for sha, offset, length in r.chunks
                        if hashlib.sha256(data[offset - r.start : offset - r.start + length]).hexdigest() != sha
                    ]
                    if not bad:
                        for sha, offset, length in r.chunks:
                            self.write(sha, data[offset - r.start : offset - r.start + length])
                        faults.barrier("datasets.fetch.after_range")
                        return
                    if attempt == TRIES - 1:
                        raise StorageError(
                            f"chunk {bad[0][:12]} of pack {r.pack[:12]} does not match its sha256 after {TRIES} tries",
                            hint="the stored copy is damaged: push the dataset again",
                        )
                with self.lock:
                    self.result.refetched += 1
                time.sleep(0.2 * (attempt + 1))
        except BaseException as exc:
            self.errors.append(exc)

    def get(self, url: str, start: int, end: int) -> bytes:
        u = urllib.parse.urlsplit(url)
        conns: dict[str, http.client.HTTPConnection] = getattr(self.local, "conns", None) or {}
        self.local.conns = conns
        conn = conns.get(u.netloc)
        if conn is None:
            cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
            conn = conns[u.netloc] = cls(u.netloc, timeout=60)
        try:
            conn.request("GET", f"{u.path}?{u.query}", headers={"Range": f"bytes={start}-{end - 1}"})
            resp = conn.getresponse()
            body = resp.read()
        except BaseException:
            conn.close()
            conns.pop(u.netloc, None)
            raise
        with self.lock:
            self.result.requests += 1
            self.result.fetched_bytes += len(body)
        if resp.status == 403:
            raise _Expired()
        if resp.status not in (200, 206):
            raise StorageError(f"HTTP {resp.status} {body[:200]!r}")
        if resp.status == 200:  # the server ignored the range
            body = body[start:end]
        if len(body) != end - start:
            raise StorageError(f"short read: {len(body)} of {end - start} bytes")
        return body

    def fetch_remote(self) -> None:
        ranges = self.ranges()
        if not ranges:
            return
        self.refresh_urls(sorted({r.pack for r in ranges}))
        with ThreadPoolExecutor(self.workers, thread_name_prefix="fetch") as pool:
            list(pool.map(self.fetch_range, ranges))
        if self.errors:
            raise self.errors[0]

    # ------------------------------------------------------------------ the rest of the tree
    def finish_tree(self, old: DatasetManifest | None) -> None:
        for i in self.remaining:
            if self.remaining[i] == 0 and (self.parts / str(i)).exists():
                self.finish_file(i)
        for d in self.m.dirs:
            target = _target(self.dest, d)
            if target.is_symlink() or (target.exists() and not target.is_dir()):
                target.unlink()
            target.mkdir(exist_ok=True)
        for link in self.m.links:
            target = _target(self.dest, link.path)
            if target.is_symlink() and os.readlink(target) == link.target:
                continue
            tmp = target.with_name(f".{target.name}.choline-link")
            tmp.unlink(missing_ok=True)
            os.symlink(link.target, tmp)
            os.replace(tmp, target)
        if old is not None:
            keep = {f.path for f in self.m.files} | {x.path for x in self.m.links} | set(self.m.dirs)
            gone = [f.path for f in old.files] + [x.path for x in old.links]
            for path in gone:
                if path not in keep and not any(k.startswith(path + "/") for k in keep):
                    p = self.dest / path
                    if p.is_symlink() or p.is_file():
                        p.unlink()
            for d in sorted(old.dirs, reverse=True):
                if d not in keep:
                    p = self.dest / d
                    if p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
                        p.rmdir()

    def save_state(self, raw: bytes) -> None:
        files: dict[str, list[int]] = {}
        for f in self.m.files:
            st = (self.dest / f.path).lstat()
            files[f.path] = [st.st_size, st.st_mtime_ns]
        (self.sd / "manifest.gz.tmp").write_bytes(raw)
        os.replace(self.sd / "manifest.gz.tmp", self.sd / "manifest.gz")
        state = {"manifest": self.digest, "files": files}
        (self.sd / "state.json.tmp").write_text(json.dumps(state))
        os.replace(self.sd / "state.json.tmp", self.sd / "state.json")


class _Expired(Exception):
    """403 from the object store: the presigned URL expired (or was signed for another endpoint)."""


def _unchanged(path: Path, recorded: object) -> bool:
    try:
        st = path.lstat()
    except OSError:
        return False
    return (
        isinstance(recorded, list)
        and len(recorded) == 2
        and os.path.isfile(path)
        and not path.is_symlink()
        and [st.st_size, st.st_mtime_ns] == recorded
    )


def _target(dest: Path, rel: str) -> Path:
    """``dest/rel`` with every parent a real folder inside ``dest`` (a link or file in the way, left by an
    older version, is removed); the last component is not followed either."""
    parts = rel.split("/")
    cur = dest
    for part in parts[:-1]:
        cur = cur / part
        if cur.is_symlink() or (cur.exists() and not cur.is_dir()):
            cur.unlink()
        cur.mkdir(exist_ok=True)
    target = cur / parts[-1]
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    return target


def check_destination(dest: Path, digest: str | None = None) -> None:
    """Refuse to materialise into a folder that holds anything but an earlier choline copy (no user file is
    ever overwritten)."""
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / STATE_DIR).is_dir():
        raise UserError(
            f"{dest} is not empty and holds no dataset pulled by choline",
            hint="pull into a new or empty folder",
        )


def materialize(
    manifest: DatasetManifest,
    raw: bytes,
    dest: str | os.PathLike[str],
    urls: Urls,
    *,
    sources: Iterable[Path] = (),
    workers: int = 8,
    progress: Progress | None = None,
) -> FetchResult:
    """Make ``dest`` hold exactly ``manifest`` (whose stored bytes are ``raw``). See the module docstring."""
    t0 = time.monotonic()
    progress = progress or Progress()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).hexdigest()
    job = _Fetch(manifest, digest, dest, urls, workers, progress)
    _, old = read_state(dest)
    progress.start(f"fetch {digest[:12]}", manifest.size)
    try:
        local = job.plan([s for s in sources if s.resolve() != dest.resolve()])
        job.copy_local(local)
        job.fetch_remote()
        job.finish_tree(old)
        job.save_state(raw)
    finally:
        if job.journal is not None:
            job.journal.close()
        for conns in [getattr(job.local, "conns", {})]:
            for c in conns.values():
                c.close()
    shutil.rmtree(job.parts, ignore_errors=True)
    job.journal_path.unlink(missing_ok=True)
    progress.finish()
    job.result.seconds = time.monotonic() - t0
    return job.result
