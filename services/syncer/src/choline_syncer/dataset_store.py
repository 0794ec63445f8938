"""The syncer's dataset tables: verified packs, the chunk index, versions. Synchronous (``asyncio.to_thread``).

Writes are idempotent: registering a pack twice indexes its chunks once, committing the manifest a dataset
already has as its newest version adds no row.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from choline_core.errors import BadSpec, NotFound
from choline_core.pipeline import DatasetVersionInfo
from choline_svc.db import session

from .models import DatasetChunkRow, DatasetPackRow, DatasetVersionRow, aware, utcnow

BATCH = 500  # values per IN (...) query


@dataclass(frozen=True)
class StoredVersion:
    id: int
    owner: str
    name: str
    manifest: str
    size: int
    files: int
    chunks: int
    packs: list[str]
    source: str | None
    created_at: datetime

    def info(self) -> DatasetVersionInfo:
        return DatasetVersionInfo(
            name=self.name,
            owner=self.owner,
            manifest=self.manifest,
            size=self.size,
            files=self.files,
            chunks=self.chunks,
            packs=len(self.packs),
            created_at=self.created_at,
            source=self.source,
        )


def _version(row: DatasetVersionRow) -> StoredVersion:
    assert row.id is not None
    return StoredVersion(
        id=row.id,
        owner=row.owner,
        name=row.name,
        manifest=row.manifest,
        size=row.size,
        files=row.files,
        chunks=row.chunks,
        packs=list(json.loads(row.packs)),
        source=row.source,
        created_at=aware(row.created_at) or utcnow(),
    )


def _batches(items: Sequence[str]) -> Iterable[list[str]]:
    for i in range(0, len(items), BATCH):
        yield list(items[i : i + BATCH])


class DatasetStore:
    def __init__(self, engine: object) -> None:
        self.engine = engine

    # ------------------------------------------------------------------ chunks and packs
    def lookup(self, shas: Sequence[str]) -> dict[str, tuple[str, int, int]]:
        """sha -> (pack, offset, length) for the chunks that are indexed (one place each)."""
        out: dict[str, tuple[str, int, int]] = {}
        with session(self.engine) as s:  # type: ignore[arg-type]
            for part in _batches(sorted(set(shas))):
                for row in s.exec(select(DatasetChunkRow).where(col(DatasetChunkRow.sha).in_(part))).all():
                    out.setdefault(row.sha, (row.pack, row.pos, row.length))
        return out

    def places(self, shas: Sequence[str]) -> set[tuple[str, str, int, int]]:
        """Every (sha, pack, offset, length) the index holds for these chunks."""
        out: set[tuple[str, str, int, int]] = set()
        with session(self.engine) as s:  # type: ignore[arg-type]
            for part in _batches(sorted(set(shas))):
                for row in s.exec(select(DatasetChunkRow).where(col(DatasetChunkRow.sha).in_(part))).all():
                    out.add((row.sha, row.pack, row.pos, row.length))
        return out

    def known_packs(self, digests: Sequence[str]) -> set[str]:
        with session(self.engine) as s:  # type: ignore[arg-type]
            return {
                d
                for part in _batches(sorted(set(digests)))
                for d in s.exec(select(DatasetPackRow.digest).where(col(DatasetPackRow.digest).in_(part))).all()
            }

    def record_pack(self, digest: str, size: int, chunks: Sequence[tuple[str, int, int]]) -> int:
        """Index a verified pack; returns how many chunks were not indexed anywhere before."""

        def write() -> int:
            with session(self.engine) as s:  # type: ignore[arg-type]
                if s.get(DatasetPackRow, digest) is not None:
                    return 0
                unique = {sha: (off, n) for sha, off, n in chunks}
                before: set[str] = set()
                for part in _batches(sorted(unique)):
                    before |= set(s.exec(select(DatasetChunkRow.sha).where(col(DatasetChunkRow.sha).in_(part))).all())
                s.add(DatasetPackRow(digest=digest, size=size, chunks=len(unique), created_at=utcnow()))
                s.add_all(DatasetChunkRow(sha=sha, pack=digest, pos=off, length=n) for sha, (off, n) in unique.items())
                return len(set(unique) - before)

        try:
            return write()
        except IntegrityError:  # another replica indexed it first
            return write()

    def forget_pack(self, digest: str) -> None:
        """Drop a pack that is no longer in object storage, so the next push uploads its chunks again."""
        with session(self.engine) as s:  # type: ignore[arg-type]
            s.execute(delete(DatasetChunkRow).where(col(DatasetChunkRow.pack) == digest))
            s.execute(delete(DatasetPackRow).where(col(DatasetPackRow.digest) == digest))

    # ------------------------------------------------------------------ versions
    def add_version(
        self,
        *,
        owner: str,
        name: str,
        manifest: str,
        size: int,
        files: int,
        chunks: int,
        packs: list[str],
        source: str | None,
    ) -> StoredVersion:
        with session(self.engine) as s:  # type: ignore[arg-type]
            latest = s.exec(
                select(DatasetVersionRow)
                .where(col(DatasetVersionRow.owner) == owner, col(DatasetVersionRow.name) == name)
                .order_by(col(DatasetVersionRow.id).desc())
            ).first()
            if latest is not None and latest.manifest == manifest:
                return _version(latest)
            row = DatasetVersionRow(
                owner=owner,
                name=name,
                manifest=manifest,
                size=size,
                files=files,
                chunks=chunks,
                packs=json.dumps(packs),
                source=(source or "")[:1024] or None,
                created_at=utcnow(),
            )
            s.add(row)
            s.flush()
            return _version(row)

    def versions(self, owner: str | None, name: str | None = None) -> list[StoredVersion]:
        """Newest first."""
        with session(self.engine) as s:  # type: ignore[arg-type]
            q = select(DatasetVersionRow)
            if owner is not None:
                q = q.where(col(DatasetVersionRow.owner) == owner)
            if name is not None:
                q = q.where(col(DatasetVersionRow.name) == name)
            return [_version(r) for r in s.exec(q.order_by(col(DatasetVersionRow.id).desc())).all()]

    def find(self, owner: str | None, name: str, manifest: str | None) -> StoredVersion:
        """The newest version of ``name``, or the one whose manifest digest starts with ``manifest``."""
        rows = self.versions(owner, name)
        if not rows:
            raise NotFound(f"no dataset {name!r}", hint="'choline data ls' lists them; 'choline data push' makes one")
        if not manifest:
            return rows[0]
        hits = {r.manifest: r for r in rows if r.manifest.startswith(manifest)}
        if not hits:
            raise NotFound(f"dataset {name!r} has no version {manifest!r}", hint=f"'choline data show {name}'")
        if len(hits) > 1:
            raise BadSpec(f"{manifest!r} matches {len(hits)} versions of {name!r}: give more of the digest")
        return next(iter(hits.values()))

    def by_manifest(self, manifest: str) -> StoredVersion | None:
        with session(self.engine) as s:  # type: ignore[arg-type]
            row = s.exec(
                select(DatasetVersionRow)
                .where(col(DatasetVersionRow.manifest) == manifest)
                .order_by(col(DatasetVersionRow.id).desc())
            ).first()
            return _version(row) if row is not None else None
