"""The monitor's own tables (migrations: ``monitor_0002``) and the public shape of a finding.

- ``monitor_finding``: one row per finding, id = ``finding_id(run, detector, episode)``, unique on
  (run, detector, episode); ``published_at`` is NULL until the FindingRaised event is in JetStream
  (the outbox: a sweep publishes what a crash left unpublished).
- ``monitor_run``: one row per watched run: the watch's JSON state with a version for guarded
  updates, the run's config overrides, and whether the run has ended; its ``policy``
  (``monitor_0003``, see ``actions.py``).

The advisor's answers and the monitor's actions are in ``advice_store.py`` (``monitor_0003``).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Boolean, Column, DateTime, Text
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _aware(dt: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; they were stored in UTC."""
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    return dt


class FindingRow(SQLModel, table=True):
    __tablename__ = "monitor_finding"

    id: str = Field(primary_key=True, max_length=32)
    run_id: str = Field(max_length=128)
    attempt: int | None = None
    detector: str = Field(max_length=32)
    severity: str = Field(max_length=16)
    episode: int
    step: int | None = None
    data_ts: float
    message: str = Field(sa_column=Column(Text, nullable=False))
    evidence: str = Field(sa_column=Column(Text, nullable=False))
    supersedes: str | None = Field(default=None, max_length=32)
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    published_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))

    def public(self) -> FindingPublic:
        return FindingPublic(
            id=self.id,
            run_id=self.run_id,
            attempt=self.attempt,
            detector=self.detector,
            severity=self.severity,
            episode=self.episode,
            step=self.step,
            ts=datetime.fromtimestamp(self.data_ts, timezone.utc),
            message=self.message,
            evidence=json.loads(self.evidence),
            supersedes=self.supersedes,
            created_at=_aware(self.created_at) or utcnow(),
            published=self.published_at is not None,
        )


class RunRow(SQLModel, table=True):
    __tablename__ = "monitor_run"

    run_id: str = Field(primary_key=True, max_length=128)
    version: int = 0
    overrides: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    state: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    closed: bool = Field(default=False, sa_column=Column(Boolean, nullable=False, default=False))
    policy: str | None = Field(default=None, max_length=16)  # notify | auto-pause (monitor_0003; None: the default)
    updated_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class FindingPublic(BaseModel):
    """A finding as the CLI, the API and the web page see it."""

    id: str
    run_id: str
    attempt: int | None
    detector: str
    severity: str
    episode: int
    step: int | None
    ts: datetime
    message: str
    evidence: dict[str, Any]
    supersedes: str | None
    created_at: datetime
    published: bool
