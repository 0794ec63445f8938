"""This machine's dataset caches, in ``$CHOLINE_HOME/datasets/state.sqlite``:

- ``file_chunks``: a file's chunk list keyed by (path, size, mtime, inode) and the chunking parameters, so an
  unchanged file is not read again on the next push;
- ``uploaded_packs``: packs PUT to a control plane (``remote``) with their index, and whether the syncer has
  indexed them. A push killed between the PUT and the syncer's answer registers them first when run again,
  so no stored pack is sent twice.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

from .chunking import PARAMS
from .paths import home
from .tree import FileEntry

SCHEMA = """
CREATE TABLE IF NOT EXISTS file_chunks (
    abspath TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, ino INTEGER, params TEXT, chunks TEXT
);
CREATE TABLE IF NOT EXISTS uploaded_packs (
    remote TEXT, digest TEXT, chunks TEXT, registered INTEGER DEFAULT 0, PRIMARY KEY (remote, digest)
);
"""


class LocalState:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or home() / "datasets" / "state.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------ file chunk lists
    def cached_chunks(self, f: FileEntry) -> list[tuple[int, str]] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT size, mtime_ns, ino, params, chunks FROM file_chunks WHERE abspath = ?", (f.abspath,)
            ).fetchone()
        if row is None or tuple(row[:4]) != (f.size, f.mtime_ns, f.ino, PARAMS):
            return None
        return [(int(n), str(s)) for n, s in json.loads(row[4])]

    def store_chunks(self, entries: list[tuple[FileEntry, list[tuple[int, str]]]]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO file_chunks VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (f.abspath, f.size, f.mtime_ns, f.ino, PARAMS, json.dumps(chunks, separators=(",", ":")))
                    for f, chunks in entries
                ],
            )
            self._db.execute("COMMIT")

    # ------------------------------------------------------------------ the uploaded-packs journal
    def journal_pack(self, remote: str, digest: str, chunks: list[tuple[str, int, int]]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO uploaded_packs (remote, digest, chunks) VALUES (?, ?, ?)",
                (remote, digest, json.dumps(chunks, separators=(",", ":"))),
            )

    def mark_registered(self, remote: str, digests: list[str]) -> None:
        with self._lock:
            self._db.executemany(
                "UPDATE uploaded_packs SET registered = 1 WHERE remote = ? AND digest = ?",
                [(remote, d) for d in digests],
            )

    def forget_packs(self, remote: str, digests: list[str]) -> None:
        with self._lock:
            self._db.executemany(
                "DELETE FROM uploaded_packs WHERE remote = ? AND digest = ?", [(remote, d) for d in digests]
            )

    def unregistered(self, remote: str) -> dict[str, list[tuple[str, int, int]]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT digest, chunks FROM uploaded_packs WHERE remote = ? AND registered = 0", (remote,)
            ).fetchall()
        return {d: [(str(s), int(o), int(n)) for s, o, n in json.loads(c)] for d, c in rows}
