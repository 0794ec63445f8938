"""The syncer's database work. Synchronous (SQLAlchemy); the service calls it through ``asyncio.to_thread``.

Every write is idempotent: a redelivered event finds its row and changes nothing, and two replicas
racing on one insert settle on the unique constraint (the loser re-reads).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from choline_core.pipeline import ArtifactInfo, CheckpointInfo
from choline_svc.db import session

from .models import ArtifactRow, BoxEndpointRow, CheckpointRow, ControlRow, aware, utcnow

T = TypeVar("T")


@dataclass(frozen=True)
class StoredCheckpoint:
    id: int
    run_id: str
    attempt: int
    step: int
    prefix: str
    reason: str
    size: int
    files: list[dict[str, Any]]
    metrics: dict[str, float | None]
    created_at: datetime
    deleted_at: datetime | None

    def info(self) -> CheckpointInfo:
        return CheckpointInfo(
            run_id=self.run_id,
            attempt=self.attempt,
            step=self.step,
            prefix=self.prefix,
            reason=self.reason,
            size=self.size,
            files=len(self.files),
            metrics=self.metrics,
            created_at=self.created_at,
            deleted_at=self.deleted_at,
        )


def _checkpoint(row: CheckpointRow) -> StoredCheckpoint:
    assert row.id is not None
    return StoredCheckpoint(
        id=row.id,
        run_id=row.run_id,
        attempt=row.attempt,
        step=row.step,
        prefix=row.prefix,
        reason=row.reason,
        size=row.size,
        files=json.loads(row.files),
        metrics=json.loads(row.metrics),
        created_at=aware(row.created_at) or utcnow(),
        deleted_at=aware(row.deleted_at),
    )


def _retry_on_conflict(fn: Callable[[], T]) -> T:
    """Run ``fn`` again once if a concurrent insert won the unique constraint (it then finds the row)."""
    try:
        return fn()
    except IntegrityError:
        return fn()


class SyncerStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # ------------------------------------------------------------------ box endpoints
    def record_endpoint(self, run_id: str, attempt: int, box_id: str | None, s3_endpoint: str) -> None:
        def write() -> None:
            with session(self.engine) as s:
                row = s.get(BoxEndpointRow, (run_id, attempt))
                if row is None:
                    s.add(
                        BoxEndpointRow(
                            run_id=run_id, attempt=attempt, box_id=box_id, s3_endpoint=s3_endpoint, updated_at=utcnow()
                        )
                    )
                elif row.s3_endpoint != s3_endpoint or row.box_id != box_id:
                    row.s3_endpoint, row.box_id, row.updated_at = s3_endpoint, box_id, utcnow()
                    s.add(row)

        _retry_on_conflict(write)

    def record_control(self, run_id: str, attempt: int, ack: dict[str, Any]) -> bool:
        """Remember an applied (or refused) control command once; ``False`` for a redelivery."""

        def write() -> bool:
            with session(self.engine) as s:
                found = s.exec(
                    select(ControlRow).where(
                        col(ControlRow.run_id) == run_id, col(ControlRow.control_id) == str(ack["id"])
                    )
                ).first()
                if found is not None:
                    return False
                s.add(
                    ControlRow(
                        run_id=run_id,
                        control_id=str(ack["id"]),
                        attempt=attempt,
                        step=int(ack["step"]),
                        tick=int(ack.get("tick") or 0),
                        ok=bool(ack.get("ok")),
                        ack=json.dumps(ack, sort_keys=True),
                        created_at=utcnow(),
                    )
                )
                return True

        return bool(_retry_on_conflict(write))

    def controls(self, run_id: str) -> list[dict[str, Any]]:
        """The run's applied control commands, in the order they took effect."""
        with session(self.engine) as s:
            rows = s.exec(select(ControlRow).where(col(ControlRow.run_id) == run_id, col(ControlRow.ok).is_(True)))
            ordered = sorted(rows, key=lambda r: (r.step, r.tick, r.id or 0))
            return [json.loads(r.ack) for r in ordered]

    def endpoint_for(self, run_id: str, attempt: int) -> str | None:
        with session(self.engine) as s:
            row = s.get(BoxEndpointRow, (run_id, attempt))
            return row.s3_endpoint if row is not None else None

    # ------------------------------------------------------------------ checkpoints
    def record_checkpoint(
        self,
        *,
        run_id: str,
        attempt: int,
        step: int,
        prefix: str,
        reason: str,
        files: Sequence[dict[str, Any]],
        metrics: dict[str, float | None],
    ) -> tuple[StoredCheckpoint, bool]:
        """Insert the committed checkpoint unless it is there already; returns (row, inserted)."""

        def write() -> tuple[StoredCheckpoint, bool]:
            with session(self.engine) as s:
                found = s.exec(
                    select(CheckpointRow).where(
                        col(CheckpointRow.run_id) == run_id,
                        col(CheckpointRow.attempt) == attempt,
                        col(CheckpointRow.step) == step,
                    )
                ).first()
                if found is not None:
                    return _checkpoint(found), False
                row = CheckpointRow(
                    run_id=run_id,
                    attempt=attempt,
                    step=step,
                    prefix=prefix,
                    reason=reason,
                    files=json.dumps(list(files), sort_keys=True),
                    size=sum(int(f.get("size", 0)) for f in files),
                    metrics=json.dumps(metrics, sort_keys=True),
                    created_at=utcnow(),
                    committed=True,
                )
                s.add(row)
                s.flush()
                return _checkpoint(row), True

        return _retry_on_conflict(write)

    def checkpoints(self, run_id: str, *, include_deleted: bool = False) -> list[StoredCheckpoint]:
        """The run's checkpoints by step, then attempt."""
        with session(self.engine) as s:
            q = select(CheckpointRow).where(col(CheckpointRow.run_id) == run_id, col(CheckpointRow.committed))
            if not include_deleted:
                q = q.where(col(CheckpointRow.deleted_at).is_(None))
            rows = s.exec(q.order_by(col(CheckpointRow.step), col(CheckpointRow.attempt))).all()
            return [_checkpoint(r) for r in rows]

    def mark_deleted(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        with session(self.engine) as s:
            s.execute(
                update(CheckpointRow)
                .where(col(CheckpointRow.id).in_(list(ids)), col(CheckpointRow.deleted_at).is_(None))
                .values(deleted_at=utcnow())
            )

    # ------------------------------------------------------------------ artifacts
    def record_artifacts(self, run_id: str, attempt: int, files: Sequence[tuple[str, int, str, str, bool]]) -> int:
        """Upsert (path, size, sha256, key, bundle) rows; returns how many rows changed."""

        def write() -> int:
            changed = 0
            with session(self.engine) as s:
                existing = {
                    r.path: r for r in s.exec(select(ArtifactRow).where(col(ArtifactRow.run_id) == run_id)).all()
                }
                for path, size, sha, key, bundle in files:
                    row = existing.get(path)
                    if row is None:
                        s.add(
                            ArtifactRow(
                                run_id=run_id,
                                path=path,
                                attempt=attempt,
                                size=size,
                                sha256=sha,
                                key=key,
                                bundle=bundle,
                                created_at=utcnow(),
                            )
                        )
                        changed += 1
                    elif (row.size, row.sha256, row.attempt, row.bundle) != (size, sha, attempt, bundle):
                        row.size, row.sha256, row.attempt, row.bundle, row.key = size, sha, attempt, bundle, key
                        row.created_at = utcnow()
                        s.add(row)
                        changed += 1
            return changed

        return _retry_on_conflict(write)

    def artifacts(self, run_id: str) -> list[tuple[ArtifactInfo, bool]]:
        with session(self.engine) as s:
            rows = s.exec(
                select(ArtifactRow).where(col(ArtifactRow.run_id) == run_id).order_by(col(ArtifactRow.path))
            ).all()
            return [
                (ArtifactInfo(path=r.path, key=r.key, size=r.size, sha256=r.sha256, attempt=r.attempt), r.bundle)
                for r in rows
            ]
