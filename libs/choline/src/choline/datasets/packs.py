"""Packfiles: chunks back to back, then their JSON index, then a 16-byte footer (see ``choline_core.pipeline``).

A pack is built in memory (~16 MiB) and uploaded with one PUT. Its name is the sha256 of its index, which
names every chunk by its sha256 with its offset and length: a content address of the whole pack (given
checked chunks) that costs no second pass over 16 MiB.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from choline_core.pipeline import PACK_TARGET, pack_footer


@dataclass
class Pack:
    digest: str
    data: bytes
    chunks: list[tuple[str, int, int]]  # (sha256, offset, length)

    @property
    def payload(self) -> int:
        return sum(n for _, _, n in self.chunks)


@dataclass
class PackBuilder:
    target: int = PACK_TARGET
    parts: list[bytes] = field(default_factory=list)
    chunks: list[tuple[str, int, int]] = field(default_factory=list)
    size: int = 0

    def add(self, sha: str, data: bytes) -> None:
        self.chunks.append((sha, self.size, len(data)))
        self.parts.append(data)
        self.size += len(data)

    @property
    def full(self) -> bool:
        return self.size >= self.target

    def __len__(self) -> int:
        return len(self.chunks)

    def finish(self) -> Pack:
        index = json.dumps({"chunks": [list(c) for c in self.chunks]}, separators=(",", ":")).encode()
        data = b"".join([*self.parts, index, pack_footer(len(index))])
        pack = Pack(hashlib.sha256(index).hexdigest(), data, self.chunks)
        self.parts, self.chunks, self.size = [], [], 0
        return pack
