"""The monitor's database work: watch state with guarded updates, findings, the outbox.

Synchronous (SQLAlchemy); the service calls it through ``asyncio.to_thread``.

``commit()`` is the one write a handled message makes: it moves the run's row from the version
the watch was loaded at to the next one (``WHERE version = ?``) and inserts the new findings, in
one transaction. If another replica moved the row first nothing is written and ``StaleState``
says to reload and retry. A finding already stored (same deterministic id) is not stored again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from choline_svc.db import session

from .models import FindingRow, RunRow, utcnow
from .watch import Finding


class StaleState(Exception):
    """The run's row changed since it was loaded (another replica, or a config change)."""


@dataclass
class StoredRun:
    version: int
    overrides: dict[str, Any] | None
    state: dict[str, Any] | None
    closed: bool


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, default=str)


class MonitorStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # ------------------------------------------------------------------ runs
    def load_run(self, run_id: str) -> StoredRun | None:
        with session(self.engine) as s:
            row = s.get(RunRow, run_id)
            if row is None:
                return None
            return StoredRun(
                version=row.version,
                overrides=json.loads(row.overrides) if row.overrides else None,
                state=json.loads(row.state) if row.state else None,
                closed=row.closed,
            )

    def commit(
        self, run_id: str, version: int | None, state: dict[str, Any], closed: bool, findings: Sequence[Finding]
    ) -> int:
        """Store the watch's state and new findings; returns the row's new version."""
        now = utcnow()
        try:
            with session(self.engine) as s:
                if version is None:
                    s.add(RunRow(run_id=run_id, version=1, state=_dumps(state), closed=closed, updated_at=now))
                    s.flush()
                    new_version = 1
                else:
                    res = s.execute(
                        update(RunRow)
                        .where(col(RunRow.run_id) == run_id, col(RunRow.version) == version)
                        .values(version=version + 1, state=_dumps(state), closed=closed, updated_at=now)
                    )
                    if res.rowcount != 1:  # type: ignore[attr-defined]
                        raise StaleState(run_id)
                    new_version = version + 1
                for f in findings:
                    if s.get(FindingRow, f.id) is None:
                        s.add(_row(f, now))
                s.flush()
        except IntegrityError as exc:  # a concurrent first insert of the run, or of a finding
            raise StaleState(run_id) from exc
        return new_version

    def set_overrides(self, run_id: str, overrides: dict[str, Any] | None) -> None:
        """Store a run's config overrides (before or during the run); bumps the version so caches reload."""
        now = utcnow()
        text = _dumps(overrides) if overrides else None
        for _ in range(3):
            try:
                with session(self.engine) as s:
                    row = s.get(RunRow, run_id)
                    if row is None:
                        s.add(RunRow(run_id=run_id, version=1, overrides=text, updated_at=now))
                    else:
                        s.execute(
                            update(RunRow)
                            .where(col(RunRow.run_id) == run_id)
                            .values(overrides=text, version=RunRow.version + 1, updated_at=now)
                        )
                return
            except IntegrityError:
                continue
        raise StaleState(run_id)

    # ------------------------------------------------------------------ findings
    def findings(self, run_id: str | None = None, *, detector: str | None = None, limit: int = 100) -> list[FindingRow]:
        with session(self.engine) as s:
            q = select(FindingRow)
            if run_id:
                q = q.where(col(FindingRow.run_id) == run_id)
            if detector:
                q = q.where(col(FindingRow.detector) == detector)
            q = q.order_by(col(FindingRow.data_ts), col(FindingRow.id)).limit(limit)
            return list(s.exec(q).all())

    def unpublished(self, limit: int = 200) -> list[FindingRow]:
        with session(self.engine) as s:
            q = (
                select(FindingRow)
                .where(col(FindingRow.published_at).is_(None))
                .order_by(col(FindingRow.data_ts))
                .limit(limit)
            )
            return list(s.exec(q).all())

    def mark_published(self, ids: Sequence[str], when: datetime | None = None) -> None:
        if not ids:
            return
        with session(self.engine) as s:
            s.execute(
                update(FindingRow)
                .where(col(FindingRow.id).in_(list(ids)), col(FindingRow.published_at).is_(None))
                .values(published_at=when or utcnow())
            )


def _row(f: Finding, now: datetime) -> FindingRow:
    return FindingRow(
        id=f.id,
        run_id=f.run_id,
        attempt=f.attempt,
        detector=f.detector,
        severity=f.severity,
        episode=f.episode,
        step=f.step,
        data_ts=f.t,
        message=f.message,
        evidence=_dumps(f.evidence),
        supersedes=f.supersedes,
        created_at=now,
    )


def row_to_finding(row: FindingRow) -> Finding:
    return Finding(
        id=row.id,
        run_id=row.run_id,
        detector=row.detector,
        severity=row.severity,
        step=row.step,
        t=row.data_ts,
        message=row.message,
        evidence=json.loads(row.evidence),
        episode=row.episode,
        attempt=row.attempt,
        supersedes=row.supersedes,
    )
