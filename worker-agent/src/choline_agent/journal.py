"""The agent's on-disk outbox: every message bound for JetStream is written here first.

A publisher reads records in order from the acknowledged cursor and publishes them; only a JetStream ack
moves the cursor. So when NATS is unreachable for minutes or hours, training goes on and the records pile
up on disk; on reconnection they are replayed **as written**: same envelope ids (JetStream deduplicates
within its window) and the same ``(attempt, seq)`` keys (the stores deduplicate after it). An agent that
restarts replays what its predecessor left unacknowledged.

Layout (``<workdir>/journal/``)::

    seg-00000001.jsonl    one record per line: {"s": subject, "e": envelope}
    cursor.json           {"seg": n, "off": bytes}: the first record not yet acknowledged
    counters.json         reserved sequence numbers (see ``Counters``)

A writer never appends to a segment a previous process wrote (a crash may have left a partial last line,
which the reader skips). Disk is bounded: beyond ``limit_bytes`` the oldest segment is dropped, and
``dropped`` counts the records lost that way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from choline_core.events import Envelope

log = logging.getLogger(__name__)

SEGMENT_BYTES = 4 * 1024 * 1024
CURSOR = "cursor.json"
COUNTERS = "counters.json"


@dataclass(frozen=True)
class Record:
    subject: str
    envelope: Envelope
    end: tuple[int, int]  # (segment, offset) just after this record


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _seg_name(n: int) -> str:
    return f"seg-{n:08d}.jsonl"


class Journal:
    def __init__(self, directory: str | os.PathLike[str], limit_bytes: int = 512 * 1024 * 1024) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.limit_bytes = max(limit_bytes, 2 * SEGMENT_BYTES)
        self.dropped = 0
        self.appended = 0
        self.acked = 0
        self._sizes: dict[int, int] = {}
        for p in self.dir.glob("seg-*.jsonl"):
            try:
                self._sizes[int(p.name[4:12])] = p.stat().st_size
            except (ValueError, OSError):
                continue
        cursor = self._load_cursor()
        first = min(self._sizes, default=1)
        self._cursor: tuple[int, int] = cursor if cursor and cursor[0] in self._sizes else (first, 0)
        for n in [n for n in self._sizes if n < self._cursor[0]]:  # fully acknowledged before a crash
            self._remove(n)
        self._wseg = max(self._sizes, default=0) + 1
        self._wfh: IO[bytes] = open(self.dir / _seg_name(self._wseg), "ab")  # noqa: SIM115 - closed in close()
        self._sizes[self._wseg] = 0
        if self._cursor[0] not in self._sizes:
            self._cursor = (self._wseg, 0)
        self._rfh: IO[bytes] | None = None
        self._rseg = 0
        self._saved_cursor = self._cursor
        self._last_save = 0.0
        self._new: asyncio.Event | None = None

    # ------------------------------------------------------------------ writing
    def append(self, subject: str, env: Envelope) -> None:
        line = b'{"s":' + json.dumps(subject).encode() + b',"e":' + env.to_bytes() + b"}\n"
        if self._sizes[self._wseg] and self._sizes[self._wseg] + len(line) > SEGMENT_BYTES:
            self._rotate()
        self._wfh.write(line)
        self._wfh.flush()
        self._sizes[self._wseg] += len(line)
        self.appended += 1
        self._enforce_limit()
        if self._new is not None:
            self._new.set()

    def _rotate(self) -> None:
        self._wfh.close()
        self._wseg += 1
        self._wfh = open(self.dir / _seg_name(self._wseg), "ab")  # noqa: SIM115
        self._sizes[self._wseg] = 0

    def _enforce_limit(self) -> None:
        while sum(self._sizes.values()) > self.limit_bytes and len(self._sizes) > 1:
            oldest = min(self._sizes)
            if oldest == self._wseg:
                return
            lost = self._count_lines(oldest, self._cursor[1] if self._cursor[0] == oldest else 0)
            if self._cursor[0] <= oldest:
                self.dropped += lost
                log.warning("journal over %d MB: dropped %d unsent messages", self.limit_bytes >> 20, lost)
                nxt = min(n for n in self._sizes if n > oldest)
                self._cursor = (nxt, 0)
            self._remove(oldest)
            self._save_cursor(force=True)

    def _count_lines(self, seg: int, offset: int) -> int:
        try:
            with open(self.dir / _seg_name(seg), "rb") as fh:
                fh.seek(offset)
                return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
        except OSError:
            return 0

    def _remove(self, seg: int) -> None:
        if self._rseg == seg and self._rfh is not None:
            self._rfh.close()
            self._rfh = None
            self._rseg = 0
        self._sizes.pop(seg, None)
        try:
            (self.dir / _seg_name(seg)).unlink()
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ reading
    def peek(self, limit: int) -> list[Record]:
        """Up to ``limit`` records from the cursor on (not consumed until ``ack``)."""
        out: list[Record] = []
        seg, off = self._cursor
        while len(out) < limit and seg in self._sizes:
            fh = self._reader(seg)
            fh.seek(off)
            while len(out) < limit:
                line = fh.readline()
                if not line:
                    break
                if not line.endswith(b"\n"):
                    if seg == self._wseg:
                        break  # cannot happen with whole-line writes; wait for the rest
                    log.warning("journal segment %d ends with a partial record (a crash); skipping it", seg)
                    off += len(line)
                    continue
                off += len(line)
                try:
                    raw = json.loads(line)
                    out.append(Record(str(raw["s"]), Envelope.parse(raw["e"]), (seg, off)))
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("journal: skipping an unreadable record (%s)", exc)
                    if not out:  # nothing to acknowledge it with: move past it now
                        self._cursor = (seg, off)
            if len(out) >= limit or seg == self._wseg:
                break
            nxt = min(n for n in self._sizes if n > seg)  # the writer's segment is always later
            if not out:  # this older segment is used up: drop it
                self._cursor = (nxt, 0)
                self._remove(seg)
                self._save_cursor(force=True)
            seg, off = nxt, 0
        return out

    def _reader(self, seg: int) -> IO[bytes]:
        if self._rseg != seg or self._rfh is None:
            if self._rfh is not None:
                self._rfh.close()
            self._rfh = open(self.dir / _seg_name(seg), "rb")  # noqa: SIM115
            self._rseg = seg
        return self._rfh

    def ack(self, end: tuple[int, int], count: int) -> None:
        """Everything up to ``end`` (a ``Record.end``) is in JetStream."""
        seg, off = end
        self.acked += count
        self._cursor = end
        for n in [n for n in self._sizes if n < seg]:
            self._remove(n)
        if seg != self._wseg and off >= self._sizes.get(seg, 0):
            self._cursor = (min(n for n in self._sizes if n > seg), 0)
            self._remove(seg)
        self._save_cursor()

    @property
    def pending(self) -> bool:
        """Whether some record is not yet acknowledged."""
        seg, off = self._cursor
        return any(size for n, size in self._sizes.items() if n > seg) or off < self._sizes.get(seg, 0)

    async def wait_new(self, timeout: float) -> None:
        """Until a record is appended (or ``timeout``)."""
        if self._new is None:
            self._new = asyncio.Event()
        self._new.clear()
        waiter = asyncio.ensure_future(self._new.wait())
        try:
            await asyncio.wait({waiter}, timeout=timeout)
        finally:
            waiter.cancel()

    # ------------------------------------------------------------------ cursor
    def _load_cursor(self) -> tuple[int, int] | None:
        try:
            raw = json.loads((self.dir / CURSOR).read_text())
            return int(raw["seg"]), int(raw["off"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _save_cursor(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._cursor == self._saved_cursor or (not force and now - self._last_save < 0.5):
            return
        _write_atomic(self.dir / CURSOR, {"seg": self._cursor[0], "off": self._cursor[1]})
        self._saved_cursor = self._cursor
        self._last_save = now

    def close(self) -> None:
        self._save_cursor(force=True)
        self._wfh.close()
        if self._rfh is not None:
            self._rfh.close()
            self._rfh = None


class Counters:
    """Sequence numbers that survive an agent restart without ever being reused.

    Numbers are reserved on disk in blocks; a restarted agent starts after the last reservation, so a
    crash leaves a gap (harmless) and never a duplicate ``(attempt, seq)``.
    """

    BLOCK = 1000

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            raw = json.loads(self.path.read_text())
            self._reserved = {str(k): int(v) for k, v in raw.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            self._reserved = {}
        self._next = dict(self._reserved)

    def take(self, name: str, n: int = 1) -> int:
        """The first of ``n`` consecutive numbers of counter ``name``."""
        start = self._next.get(name, 0)
        self._next[name] = start + n
        if self._next[name] > self._reserved.get(name, 0):
            self._reserved[name] = self._next[name] + self.BLOCK
            _write_atomic(self.path, self._reserved)
        return start
