"""Turning training state into files that load without pickle.

A state is a tree of dicts, lists and tuples whose leaves are tensors, NumPy arrays and plain Python values.
``snapshot()`` copies it into CPU memory (reusing buffers between checkpoints, so the training stall is one
memcpy and no page faults); ``write_safetensors()`` streams the tensors into a ``.safetensors`` file while
hashing it; the rest of the tree, with tensors replaced by references, goes through ``torch.save`` and loads
back with ``torch.load(weights_only=True)``: no arbitrary object is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from choline_core.errors import UserError

TENSOR = "__choline_tensor__"
NDARRAY = "__choline_ndarray__"

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code

_PLAIN = (type(None), bool, int, float, str, bytes, torch.dtype, torch.device)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class CheckpointError(UserError):
    """The state cannot be checkpointed or a checkpoint cannot be loaded into it."""

    kind = "checkpoint_error"


@dataclass
class Snapshot:
    """A CPU copy of a state tree: ``tree`` with tensor references, ``tensors[file][key]`` the tensors."""

    tree: Any
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for group in self.tensors.values() for t in group.values())


def _numpy() -> Any:
    try:
        import numpy

        return numpy
    except ImportError:  # pragma: no cover - numpy ships with torch wheels
        return None


def _is_ndarray(x: Any) -> bool:
    np = _numpy()
    return np is not None and isinstance(x, np.ndarray)


def _is_np_scalar(x: Any) -> bool:
    np = _numpy()
    return np is not None and isinstance(x, np.generic)


def file_for(top_key: str) -> str:
    """The safetensors file that holds the tensors under a top-level state key."""
    return f"{top_key}.safetensors"


def check_key(key: str) -> str:
    if not isinstance(key, str) or not _SAFE_NAME.match(key) or key.startswith("_"):
        raise CheckpointError(
            f"checkpoint state key {key!r} is not allowed",
            hint="use names of letters, digits, '.', '-' and '_' that do not start with '_'",
        )
    return key


class BufferPool:
    """CPU buffers reused across snapshots, keyed by tensor path (allocating fresh pages costs far more than a copy).

    Not thread-safe: the writer never snapshots while a write of the previous snapshot is still running.
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, str], torch.Tensor] = {}

    def get(self, file: str, key: str, like: torch.Tensor, pin: bool) -> torch.Tensor:
        buf = self._bufs.get((file, key))
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=pin)
            self._bufs[(file, key)] = buf
        return buf

    def prepare(self, state: dict[str, Any]) -> None:
        """Allocate and touch the buffers a snapshot of ``state`` will need (run this off the training thread)."""
        for top, value in state.items():
            for path, t in _tensors_of(_state_of(value), top):
                if t.dtype in _DTYPES and t.numel():
                    buf = self.get(file_for(top), _key(path), t, pin=t.is_cuda)
                    buf.reshape(-1).view(torch.uint8).zero_()

    def retain(self, used: set[tuple[str, str]]) -> None:
        """Free the buffers a snapshot no longer needed (the state's shape changed)."""
        for k in [k for k in self._bufs if k not in used]:
            del self._bufs[k]

    def clear(self) -> None:
        self._bufs.clear()


def _state_of(value: Any) -> Any:
    sd = getattr(value, "state_dict", None)
    if callable(sd) and not isinstance(value, (dict, list, tuple, torch.Tensor)):
        return sd()
    return value


def _key(path: str) -> str:
    """A tensor's key inside its file: its path below the top-level state key."""
    return path.split("/", 1)[1] if "/" in path else "_"


def _tensors_of(tree: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors_of(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _tensors_of(v, f"{prefix}/{i}" if prefix else str(i))


def snapshot(state: dict[str, Any], pool: BufferPool | None = None) -> Snapshot:
    """Copy ``state`` into CPU memory. Top-level values with ``state_dict()`` are asked for it.

    Tensors of each top-level key go to their own file (``model`` -> ``model.safetensors``, keys as in the
    state dict), so a model's weights load with plain ``safetensors.torch.load_file``.
    """
    pool = pool or BufferPool()
    snap = Snapshot(tree=None)
    pending_cuda = False
    tree: dict[str, Any] = {}
    for top, value in state.items():
        fname = file_for(top)
        group: dict[str, torch.Tensor] = {}

        def convert(x: Any, path: str, group: dict[str, torch.Tensor] = group, fname: str = fname) -> Any:
            nonlocal pending_cuda
            if isinstance(x, torch.Tensor):
                t = x.detach()
                if t.dtype not in _DTYPES:
                    raise CheckpointError(f"cannot checkpoint a tensor of dtype {t.dtype} at {path!r}")
                if t.is_sparse or t.layout != torch.strided:
                    t = t.to_dense()
                key = _key(path)
                if key in group:
                    raise CheckpointError(f"two values map to the same checkpoint key {path!r}")
                buf = pool.get(fname, key, t, pin=t.is_cuda)
                if t.is_cuda:
                    buf.copy_(t, non_blocking=True)
                    pending_cuda = True
                else:
                    buf.copy_(t)
                group[key] = buf
                return {TENSOR: [fname, key]}
            if _is_ndarray(x):
                if x.dtype.kind not in "biuf":
                    raise CheckpointError(f"cannot checkpoint a NumPy array of dtype {x.dtype} at {path!r}")
                key = _key(path)
                group[key] = torch.from_numpy(x.copy())
                return {NDARRAY: [fname, key, str(x.dtype)]}
            if _is_np_scalar(x):
                return x.item()
            if isinstance(x, _PLAIN):
                return x
            if isinstance(x, OrderedDict):
                return OrderedDict((k, convert(v, f"{path}/{k}")) for k, v in x.items())
            if isinstance(x, dict):
                out: dict[Any, Any] = {}
                for k, v in x.items():
                    if not isinstance(k, (str, int, float, bool, type(None))):
                        raise CheckpointError(f"cannot checkpoint a dict key of type {type(k).__name__} at {path!r}")
                    out[k] = convert(v, f"{path}/{k}")
                return out
            if isinstance(x, list):
                return [convert(v, f"{path}/{i}") for i, v in enumerate(x)]
            if isinstance(x, tuple):
                return tuple(convert(v, f"{path}/{i}") for i, v in enumerate(x))
            if isinstance(x, torch.Size):
                return tuple(x)
            raise CheckpointError(
                f"cannot checkpoint a {type(x).__module__}.{type(x).__qualname__} at {path!r}",
                hint="checkpoint state holds tensors, arrays, numbers, strings, lists and dicts "
                "(objects with state_dict() at the top level)",
            )

        tree[top] = convert(_state_of(value), top)
        if group:
            snap.tensors[fname] = group
    if pending_cuda:
        torch.cuda.synchronize()
    pool.retain({(f, k) for f, group in snap.tensors.items() for k in group})
    snap.tree = tree
    return snap


def rebuild(tree: Any, tensors: dict[str, dict[str, torch.Tensor]]) -> Any:
    """Inverse of ``snapshot``: put the loaded tensors back in place of their references."""
    if isinstance(tree, dict):
        if TENSOR in tree and len(tree) == 1:
            fname, key = tree[TENSOR]
            return tensors[fname][key]
        if NDARRAY in tree and len(tree) == 1:
            fname, key, dtype = tree[NDARRAY]
            return tensors[fname][key].numpy().astype(dtype)
        items = ((k, rebuild(v, tensors)) for k, v in tree.items())
        return OrderedDict(items) if isinstance(tree, OrderedDict) else dict(items)
    if isinstance(tree, list):
        return [rebuild(v, tensors) for v in tree]
    if isinstance(tree, tuple):
        return tuple(rebuild(v, tensors) for v in tree)
    return tree


# ------------------------------------------------------------------------------------ files
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class HashingWriter:
    """Write to ``<dir>/.<name>.tmp``, hash as it goes; ``commit()`` fsyncs and renames into place.

    Every ``FLUSH_EVERY`` bytes the data written so far is pushed to disk and dropped from the page cache, so a
    600 MB checkpoint never sits in memory as dirty pages (under memory pressure the kernel would make the
    training process, not just the writer, wait for them).
    """

    FLUSH_EVERY = 64 << 20

    def __init__(self, final: Path, chunk_cb: Callable[[], None] | None = None) -> None:
        self.final = final
        self.tmp = final.with_name(f".{final.name}.tmp")
        self.fh = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit/abort
        self.sha = hashlib.sha256()
        self.size = 0
        self._synced = 0
        self._chunk_cb = chunk_cb

    def write(self, data: bytes | memoryview) -> None:
        mv = memoryview(data).cast("B")
        step = 1 << 24
        for i in range(0, len(mv), step):
            part = mv[i : i + step]
            self.fh.write(part)
            self.sha.update(part)
            self.size += len(part)
            if self.size - self._synced >= self.FLUSH_EVERY:
                self._sync()
            if self._chunk_cb is not None:
                self._chunk_cb()

    def _sync(self) -> None:
        self.fh.flush()
        fd = self.fh.fileno()
        if hasattr(os, "fdatasync"):
            os.fdatasync(fd)
        else:  # macOS
            os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, self.size, os.POSIX_FADV_DONTNEED)
        self._synced = self.size

    def commit(self) -> tuple[int, str]:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        if hasattr(os, "posix_fadvise") and self.size >= self.FLUSH_EVERY:
            os.posix_fadvise(self.fh.fileno(), 0, self.size, os.POSIX_FADV_DONTNEED)
        self.fh.close()
        os.replace(self.tmp, self.final)
        return self.size, self.sha.hexdigest()

    def abort(self) -> None:
        try:
            self.fh.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes) -> tuple[int, str]:
    w = HashingWriter(path)
    try:
        w.write(data)
        return w.commit()
    except BaseException:
        w.abort()
        raise


def write_safetensors(
    path: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    chunk_cb: Callable[[], None] | None = None,
) -> tuple[int, str]:
    """Stream CPU tensors into a safetensors file (temporary name, fsync, rename); returns (size, sha256).

    Written by hand rather than with ``safetensors.torch.save_file`` because that one first copies every tensor
    into a ``bytes`` object: for a 600 MB state that is another 600 MB and a second memcpy. The format is
    tiny: an 8-byte little-endian header length, a JSON header, then the tensors' bytes back to back.
    """
    names = sorted(tensors)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name in names:
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    w = HashingWriter(path, chunk_cb)
    try:
        w.write(struct.pack("<Q", len(head)) + head)
        for name in names:
            t = tensors[name]
            if t.numel() == 0:
                continue
            if not t.is_contiguous():
                t = t.contiguous()
            w.write(t.reshape(-1).view(torch.uint8).numpy().data)
        return w.commit()
    except BaseException:
        w.abort()
        raise


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def write_tree(path: Path, tree: Any) -> tuple[int, str]:
    """The non-tensor part of a snapshot, through ``torch.save``; loadable with ``weights_only=True``."""
    import io

    buf = io.BytesIO()
    torch.save(tree, buf)
    return write_atomic(path, buf.getvalue())


def load_tree(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None
