"""Checkpoint folders: atomic, verified, written in the background.

Layout of ``<run dir>/checkpoints/<step>/``::

    model.safetensors       one safetensors file per top-level state key (tensors only)
    optimizer.safetensors
    _choline.safetensors    RNG states, loader order, ... (the library's own)
    state.pt                everything that is not a tensor; loads with torch.load(weights_only=True)
    manifest.json           each file's size and sha256; written last

A checkpoint is written into ``checkpoints/.partial-<step>/`` (each file under a temporary name, fsynced,
renamed; the manifest last), and the folder is renamed to ``<step>`` only when complete. So a process killed
mid-write leaves only a ``.partial-*`` folder (removed at the next start), and a ``<step>`` folder whose files
do not match its manifest was damaged afterwards: ``newest_valid()`` skips it with a warning and takes the
previous one.

``CheckpointWriter.save()`` costs the training loop one copy of the state into reused CPU buffers; a
background thread (at a lower scheduling priority) writes and hashes the files. A save waits for the previous
one to finish, so two never overlap.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from choline_core import faults
from choline_core.agent_protocol import (
    MANIFEST,
    CheckpointManifest,
    IncompleteCheckpoint,
    ManifestFile,
    verify_checkpoint,
)

from .serialize import (
    BufferPool,
    CheckpointError,
    Snapshot,
    _fsync_dir,
    load_safetensors,
    load_tree,
    rebuild,
    snapshot,
    write_atomic,
    write_safetensors,
    write_tree,
)

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
PARTIAL_PREFIX = ".partial-"


def checkpoint_steps(root: Path) -> list[int]:
    """Steps with a ``<step>`` folder under ``root``, newest first (complete or not)."""
    steps = []
    try:
        entries = list(root.iterdir())
    except FileNotFoundError:
        return []
    for p in entries:
        if p.is_dir() and p.name.isdigit():
            steps.append(int(p.name))
    return sorted(steps, reverse=True)


def newest_valid(root: Path, *, hashes: bool = True) -> tuple[Path, CheckpointManifest] | None:
    """The newest complete checkpoint under ``root``; damaged or incomplete ones are skipped with a warning."""
    for step in checkpoint_steps(root):
        path = root / str(step)
        try:
            return path, verify_checkpoint(path, hashes=hashes)
        except IncompleteCheckpoint as exc:
            log.warning("skipping checkpoint %s: %s; trying the previous one", step, exc)
    return None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a complete checkpoint folder into its state tree (tensors on CPU). No pickle runs."""
    manifest = verify_checkpoint(path, hashes=False)
    tensors: dict[str, Any] = {}
    for f in manifest.files:
        if f.path.endswith(".safetensors"):
            tensors[f.path] = load_safetensors(path / f.path)
    try:
        tree = load_tree(path / STATE_FILE)
    except Exception as exc:
        raise IncompleteCheckpoint(f"{path}: {STATE_FILE} does not load: {exc}") from exc
    return rebuild(tree, tensors)  # type: ignore[no-any-return]


@dataclass
class Written:
    """A checkpoint folder that is complete on disk."""

    step: int
    path: Path
    manifest: CheckpointManifest
    seconds: float  # wall time of the write (it runs at a lower priority than training)
    cpu_seconds: float = 0.0  # CPU time the writing thread used


@dataclass
class _Job:
    step: int
    snap: Snapshot | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    prepare: dict[str, Any] | None = None
    done: threading.Event = field(default_factory=threading.Event)


def _lower_priority() -> None:
    """Let the training threads win the CPU over the writer (Linux: nice applies per thread)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class CheckpointWriter:
    """Writes checkpoints of ``state`` dicts into ``root/<step>/``.

    ``on_written`` runs on the writer thread once a folder is complete (manifest written, folder renamed).
    """

    def __init__(
        self,
        root: Path,
        *,
        asynchronous: bool = True,
        on_written: Callable[[Written], None] | None = None,
    ) -> None:
        self.root = Path(root)
        self.asynchronous = asynchronous
        self.on_written = on_written
        self.pool = BufferPool()
        self.errors: list[BaseException] = []
        self.stalls: list[float] = []
        self.last: Written | None = None
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=1)
        self._pending: _Job | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)
        self._clean_partials()

    def _clean_partials(self) -> None:
        for p in self.root.glob(PARTIAL_PREFIX + "*"):
            log.info("removing an unfinished checkpoint write: %s", p)
            shutil.rmtree(p, ignore_errors=True)

    # ---------------------------------------------------------------------------------- the caller's side
    def prepare(self, state: dict[str, Any]) -> None:
        """Allocate CPU buffers for ``state`` in the background (the first save then stalls no longer)."""
        if not self.asynchronous:
            self.pool.prepare(state)
            return
        self.wait()
        self._submit(_Job(step=-1, prepare=state))

    def save(self, step: int, state: dict[str, Any], manifest: dict[str, Any] | None = None) -> float:
        """Snapshot ``state`` now and write it as checkpoint ``step``; returns the seconds the caller was held.

        ``manifest`` adds fields to ``manifest.json`` (run_id, attempt, epoch, reason, metrics, extra).
        """
        t0 = time.perf_counter()
        self.wait()
        snap = snapshot(state, self.pool)
        job = _Job(step=step, snap=snap, manifest=dict(manifest or {}))
        if self.asynchronous:
            self._submit(job)
        else:
            self._run(job)
        stall = time.perf_counter() - t0
        self.stalls.append(stall)
        return stall

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the write in flight, if any; False on timeout."""
        job = self._pending
        if job is None:
            return True
        if not job.done.wait(timeout):
            return False
        self._pending = None
        return True

    @property
    def busy(self) -> bool:
        job = self._pending
        return job is not None and not job.done.is_set()

    def close(self, timeout: float | None = None) -> None:
        self.wait(timeout)
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=5)
        self._thread = None

    def _submit(self, job: _Job) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="choline-checkpoint-writer", daemon=True)
            self._thread.start()
        self._pending = job
        self._queue.put(job)

    # ---------------------------------------------------------------------------------- the writer thread
    def _loop(self) -> None:
        _lower_priority()
        while True:
            job = self._queue.get()
            if job is None:
                return
            self._run(job)

    def _run(self, job: _Job) -> None:
        try:
            if job.prepare is not None:
                self.pool.prepare(job.prepare)
            elif job.snap is not None:
                written = self._write(job.step, job.snap, job.manifest)
                self.last = written
                if self.on_written is not None:
                    self.on_written(written)
        except BaseException as exc:
            self.errors.append(exc)
            log.error("checkpoint %s was not written: %s", job.step, exc, exc_info=not isinstance(exc, OSError))
            if not self.asynchronous:
                raise
        finally:
            job.snap = None
            job.done.set()

    def _write(self, step: int, snap: Snapshot, fields: dict[str, Any]) -> Written:
        t0, c0 = time.perf_counter(), time.thread_time()
        final = self.root / str(step)
        partial = self.root / f"{PARTIAL_PREFIX}{step}"
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        try:
            files: list[ManifestFile] = []
            for fname in sorted(snap.tensors):
                size, sha = write_safetensors(partial / fname, snap.tensors[fname], {"format": "pt"})
                files.append(ManifestFile(path=fname, size=size, sha256=sha))
                faults.barrier("checkpoint.file_written")
            size, sha = write_tree(partial / STATE_FILE, snap.tree)
            files.append(ManifestFile(path=STATE_FILE, size=size, sha256=sha))
            faults.barrier("checkpoint.before_manifest")
            manifest = CheckpointManifest(step=step, created=time.time(), files=files, **fields)
            write_atomic(partial / MANIFEST, json.dumps(manifest.model_dump(mode="json"), indent=1).encode())
            _fsync_dir(partial)
            with self._lock:
                if final.exists():
                    old = self.root / f"{PARTIAL_PREFIX}{step}-replaced"
                    shutil.rmtree(old, ignore_errors=True)
                    final.rename(old)
                    partial.rename(final)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    partial.rename(final)
                _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        faults.barrier("checkpoint.written")
        return Written(
            step=step,
            path=final,
            manifest=manifest,
            seconds=time.perf_counter() - t0,
            cpu_seconds=time.thread_time() - c0,
        )

    def remove(self, step: int) -> bool:
        """Delete checkpoint ``step`` (never the one being written)."""
        path = self.root / str(step)
        with self._lock:
            if not path.exists():
                return False
            trash = self.root / f"{PARTIAL_PREFIX}{step}-deleted"
            shutil.rmtree(trash, ignore_errors=True)
            path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
        return True


__all__ = [
    "CheckpointError",
    "CheckpointWriter",
    "Written",
    "checkpoint_steps",
    "load_checkpoint",
    "newest_valid",
]
