"""``push``: a folder becomes a dataset version, sending only the chunks object storage does not hold.

One pass over the files: chunk each (or reuse its cached chunk list when size, mtime and inode are unchanged),
ask the syncer in batches which chunks are stored, and pack the others into ~16 MiB packfiles that upload in
parallel while the scan goes on. The syncer reads every new pack back and checks each chunk before indexing
it; only then can a manifest point at it. The manifest is uploaded last and committed, which checks it again.

Killed midway, a push resumes: packs already indexed are found by the lookup, and packs PUT but not yet
indexed are in the local journal (``state.uploaded_packs``) and registered first. Nothing stored is sent
twice; at most the packs in flight at the kill are sent again.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from choline_core import faults
from choline_core.errors import CholineError, StorageError, UserError
from choline_core.pipeline import (
    MAX_DATASET_BATCH,
    DatasetManifest,
    DatasetVersionInfo,
    ManifestFile,
    ManifestLink,
    check_dataset_name,
)

from .chunking import chunk_file
from .packs import Pack, PackBuilder
from .paths import remember
from .progress import Progress
from .remote import DatasetRemote
from .state import LocalState
from .tree import FileEntry, Tree, scan

LOOKUP_BATCH = 1024
REGISTER_BATCH = 8


@dataclass
class PushResult:
    name: str
    manifest: str
    version: DatasetVersionInfo
    size: int
    files: int
    chunks: int
    new_chunks: int
    packs_sent: int
    bytes_sent: int  # packs and manifest, as sent over the wire
    resumed_packs: int
    seconds: float


class _Push:
    def __init__(self, remote: DatasetRemote, state: LocalState, progress: Progress, workers: int) -> None:
        self.remote = remote
        self.state = state
        self.progress = progress
        self.workers = workers
        self.lock = threading.Lock()
        self.locations: dict[str, tuple[str, int, int]] = {}
        self.queued: set[str] = set()  # packed or being looked up in this push
        self.failed: set[str] = set()  # chunks whose pack did not register
        self.new_chunks = 0
        self.packs_sent = 0
        self.bytes_sent = 0
        self.errors: list[BaseException] = []
        self.uploads = ThreadPoolExecutor(workers, thread_name_prefix="push-put")
        self.registers = ThreadPoolExecutor(2, thread_name_prefix="push-register")
        self.inflight = threading.BoundedSemaphore(workers * 2)
        self.futures: list[Future[None]] = []

    # ------------------------------------------------------------------ resume
    def resume(self) -> int:
        pending = self.state.unregistered(self.remote.id)
        digests = sorted(pending)
        for i in range(0, len(digests), REGISTER_BATCH):
            part = digests[i : i + REGISTER_BATCH]
            reply = self.remote.register(part)
            self.state.mark_registered(self.remote.id, reply.packs)
            self.state.forget_packs(self.remote.id, reply.missing + reply.bad)
        if digests:
            self.progress.note(f"resumed: {len(digests)} pack(s) uploaded before the interruption are indexed now")
        return len(digests)

    # ------------------------------------------------------------------ the pass
    def run(self, tree: Tree) -> list[tuple[FileEntry, list[tuple[int, str]]]]:
        files: list[tuple[FileEntry, list[tuple[int, str]]]] = []
        batch: list[tuple[str, str, int, int]] = []  # (sha, abspath, offset, length), unique, not located
        fresh: list[tuple[FileEntry, list[tuple[int, str]]]] = []
        builder = PackBuilder()
        try:
            for f in tree.files:
                chunks = self.state.cached_chunks(f)
                if chunks is None:
                    try:
                        chunks = chunk_file(f.abspath)
                    except OSError as exc:
                        raise UserError(f"cannot read {f.abspath}: {exc.strerror or exc}") from None
                    fresh.append((f, chunks))
                files.append((f, chunks))
                offset = 0
                for length, sha in chunks:
                    with self.lock:
                        known = sha in self.locations or sha in self.queued
                        if not known:
                            self.queued.add(sha)
                    if known:
                        self.progress.advance(length)
                    else:
                        batch.append((sha, f.abspath, offset, length))
                        if len(batch) >= LOOKUP_BATCH:
                            self.flush(batch, builder)
                            batch = []
                    offset += length
                if len(fresh) >= 256:
                    self.state.store_chunks(fresh)
                    fresh = []
                self.check()
            self.flush(batch, builder)
            if len(builder):
                self.submit(builder.finish())
            self.state.store_chunks(fresh)
            self.wait()
        finally:
            self.uploads.shutdown(wait=True, cancel_futures=True)
            self.registers.shutdown(wait=True, cancel_futures=True)
        self.check()
        return files

    def flush(self, batch: list[tuple[str, str, int, int]], builder: PackBuilder) -> None:
        """Look ``batch`` up; pack what is missing (submitting full packs as they fill)."""
        if not batch:
            return
        found: dict[str, tuple[str, int, int]] = {}
        for i in range(0, len(batch), MAX_DATASET_BATCH):
            reply = self.remote.chunks([b[0] for b in batch[i : i + MAX_DATASET_BATCH]])
            found.update({sha: (reply.packs[p], off, n) for sha, (p, off, n) in reply.found.items()})
        with self.lock:
            self.locations.update(found)
        for sha, path, offset, length in batch:
            if sha in found:
                self.progress.advance(length)
                continue
            builder.add(sha, _pread(path, offset, length, sha))
            if builder.full:
                self.submit(builder.finish())

    def submit(self, pack: Pack) -> None:
        self.check()
        self.inflight.acquire()
        self.futures.append(self.uploads.submit(self.upload, pack))

    def upload(self, pack: Pack) -> None:
        try:
            item = self.remote.upload_urls("pack", [pack.digest])[0]
            if not item.exists:
                if not item.url:
                    raise CholineError("the gateway gave no upload URL for a pack")
                self.remote.put(item.url, pack.data, f"pack {pack.digest[:12]}")
                with self.lock:
                    self.packs_sent += 1
                    self.bytes_sent += len(pack.data)
            self.state.journal_pack(self.remote.id, pack.digest, pack.chunks)
            faults.barrier("datasets.push.after_put")
            chunks = pack.chunks
            self.futures.append(self.registers.submit(self.register, pack.digest, chunks))
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self.inflight.release()

    def register(self, digest: str, chunks: list[tuple[str, int, int]]) -> None:
        try:
            reply = self.remote.register([digest])
            if digest in reply.packs:
                self.state.mark_registered(self.remote.id, [digest])
                with self.lock:
                    for sha, offset, length in chunks:
                        self.locations.setdefault(sha, (digest, offset, length))
                    self.new_chunks += len(chunks)
                self.progress.advance(sum(n for _, _, n in chunks))
            else:
                self.state.forget_packs(self.remote.id, [digest])
                with self.lock:
                    self.failed.update(sha for sha, _, _ in chunks)
            faults.barrier("datasets.push.after_register")
        except BaseException as exc:
            self.errors.append(exc)

    def wait(self) -> None:
        while True:
            pending = [f for f in self.futures if not f.done()]
            if not pending:
                return
            for f in pending:
                f.result()
            self.check()

    def check(self) -> None:
        if self.errors:
            raise self.errors[0]


def _pread(path: str, offset: int, length: int, sha: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(data) != length:
        raise UserError(f"{path} changed while it was being pushed", hint="push again once it stops changing")
    return data


def push(
    path: str | os.PathLike[str],
    name: str,
    remote: DatasetRemote,
    *,
    state: LocalState | None = None,
    progress: Progress | None = None,
    workers: int = 4,
    say: Callable[[str], None] | None = None,
) -> PushResult:
    """Push the folder ``path`` as the newest version of dataset ``name``; returns what moved."""
    check_dataset_name(name)
    t0 = time.monotonic()
    progress = progress or Progress()
    own_state = state is None
    state = state or LocalState()
    try:
        tree = scan(path)
        job = _Push(remote, state, progress, workers)
        resumed = job.resume()
        progress.start(f"push {name}", tree.size)
        files = job.run(tree)
        for _round in range(2):  # chunks whose pack failed verification: pack them again
            missing = sorted({sha for _, cs in files for _, sha in cs} - set(job.locations))
            if not missing:
                break
            job = _retry(job, files, missing)
        manifest = build_manifest(tree, files, job.locations)
        digest = manifest.digest()
        body = manifest.to_bytes()
        item = remote.upload_urls("manifest", [digest], name=name)[0]
        if not item.exists:
            if not item.url:
                raise CholineError("the gateway gave no upload URL for the manifest")
            remote.put(item.url, body, "the manifest")
            job.bytes_sent += len(body)
        version = remote.commit(name, digest, source=str(tree.root))
        progress.finish()
        remember(name, tree.root, digest)
        return PushResult(
            name=name,
            manifest=digest,
            version=version,
            size=tree.size,
            files=len(tree.files),
            chunks=manifest.chunk_count(),
            new_chunks=job.new_chunks,
            packs_sent=job.packs_sent,
            bytes_sent=job.bytes_sent,
            resumed_packs=resumed,
            seconds=time.monotonic() - t0,
        )
    finally:
        progress.finish()
        if own_state:
            state.close()


def _retry(prev: _Push, files: list[tuple[FileEntry, list[tuple[int, str]]]], missing: list[str]) -> _Push:
    """Upload the chunks in ``missing`` again (their pack failed verification); keeps counts and locations."""
    job = _Push(prev.remote, prev.state, prev.progress, prev.workers)
    job.locations, job.new_chunks = prev.locations, prev.new_chunks
    job.packs_sent, job.bytes_sent = prev.packs_sent, prev.bytes_sent
    want = set(missing)
    where: dict[str, tuple[str, int, int]] = {}
    for f, chunks in files:
        offset = 0
        for length, sha in chunks:
            if sha in want and sha not in where:
                where[sha] = (f.abspath, offset, length)
            offset += length
    builder = PackBuilder()
    try:
        for i in range(0, len(missing), MAX_DATASET_BATCH):
            job.flush([(sha, *where[sha]) for sha in missing[i : i + MAX_DATASET_BATCH]], builder)
        if len(builder):
            job.submit(builder.finish())
        job.wait()
    finally:
        job.uploads.shutdown(wait=True)
        job.registers.shutdown(wait=True)
    job.check()
    if set(missing) - set(job.locations):
        raise StorageError("object storage keeps refusing some packs (they fail verification after upload)")
    return job


def build_manifest(
    tree: Tree, files: list[tuple[FileEntry, list[tuple[int, str]]]], locations: dict[str, tuple[str, int, int]]
) -> DatasetManifest:
    packs = sorted({locations[sha][0] for _, chunks in files for _, sha in chunks})
    index = {p: i for i, p in enumerate(packs)}
    out: list[ManifestFile] = []
    for f, chunks in files:
        refs = []
        for length, sha in chunks:
            pack, offset, n = locations[sha]
            if n != length:
                raise StorageError(f"chunk {sha[:12]} is stored with {n} bytes, not {length}")
            refs.append((index[pack], offset, length, sha))
        out.append(ManifestFile(path=f.path, size=f.size, mode=f.mode, chunks=refs))
    manifest = DatasetManifest(
        packs=packs,
        files=out,
        links=[ManifestLink(path=p, target=t) for p, t in tree.links],
        dirs=list(tree.dirs),
    )
    manifest.validate_tree()
    return manifest


def local_root(path: str | os.PathLike[str]) -> Path:
    return Path(path).expanduser().resolve()
