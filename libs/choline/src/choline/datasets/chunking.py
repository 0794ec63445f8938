"""Content-defined chunking with FastCDC 2020 (``pyfastcdc``, Cython), every chunk named by its sha256.

Cut points depend on the bytes around them, not on offsets, so an insert in the middle of a file changes
only the chunks it touches and the ones next to them; every other chunk keeps its name and is not sent again.

Sizes: FastCDC's ``avg_size`` 64 KiB (min 16 KiB, max 256 KiB; the mean chunk is about 80 KiB). Small enough
that 100 scattered edits of ~100 KiB each move about 2 % of a 1 GiB dataset (bench/sync), large enough that a
1 GiB dataset is ~13k chunks (a manifest of under 1 MB compressed, 2048-hash lookups in a handful of calls).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

AVG = 64 * 1024
MIN = 16 * 1024
MAX = 256 * 1024
PARAMS = f"fastcdc2020/{AVG}/{MIN}/{MAX}"  # cached chunk lists are only reused for the same parameters

_chunker = None


def _fastcdc():  # type: ignore[no-untyped-def]
    global _chunker
    if _chunker is None:
        from pyfastcdc import FastCDC

        _chunker = FastCDC(AVG, min_size=MIN, max_size=MAX)
    return _chunker


def chunk_file(path: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """``[(length, sha256 hex), ...]`` of the file's chunks, in order (empty for an empty file)."""
    if os.path.getsize(path) == 0:
        return []
    return [(c.length, hashlib.sha256(c.data).hexdigest()) for c in _fastcdc().cut_file(os.fspath(path))]


def chunk_bytes(data: bytes) -> Iterator[tuple[int, int, str]]:
    """``(offset, length, sha256)`` of each chunk of ``data`` (tests and benchmarks)."""
    for c in _fastcdc().cut_buf(data):
        yield c.offset, c.length, hashlib.sha256(c.data).hexdigest()
