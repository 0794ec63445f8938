"""The advisor's and the actions' tables (``monitor_0003``), and the run's policy column.

- ``monitor_advice``: one row per advice. A finding's advice has a deterministic id
  (``advice_id(finding_id)``), so a finding handled twice (a redelivery, two replicas, the outbox
  sweep) is advised once. A row is ``pending`` until a worker that holds its lease
  (``lease_until``) stores the answer with a guarded update; a worker that died leaves the lease
  to expire and the next sweep picks the row up again.
- ``monitor_action``: what the monitor did to a run on its own (an automatic pause), one row per
  (finding, action), id ``action_id(finding_id, action)``: a finding handled twice pauses once.

Synchronous (SQLAlchemy); the service calls it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Column, DateTime, Text, func, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, SQLModel, col, select

from choline_core.advice import AdviceAnswer, AdviceInfo
from choline_svc.db import session

from .models import RunRow, _aware, utcnow


def advice_id(finding_id: str) -> str:
    return hashlib.sha256(f"advice/{finding_id}".encode()).hexdigest()[:32]


def action_id(finding_id: str, action: str) -> str:
    return hashlib.sha256(f"action/{action}/{finding_id}".encode()).hexdigest()[:32]


class AdviceRow(SQLModel, table=True):
    __tablename__ = "monitor_advice"

    id: str = Field(primary_key=True, max_length=32)
    run_id: str = Field(max_length=128)
    finding_id: str | None = Field(default=None, max_length=32)
    trigger: str = Field(max_length=16)
    question: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    by: str | None = Field(default=None, max_length=128)
    status: str = Field(max_length=16)
    source: str | None = Field(default=None, max_length=16)
    model: str | None = Field(default=None, max_length=200)
    answer: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    context: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    context_tokens: int | None = None
    tries: int = 0
    lease_until: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    answered_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    latency_s: float | None = None

    def public(self, *, include_context: bool = False) -> AdviceInfo:
        answer = None
        if self.answer:
            try:
                answer = AdviceAnswer.model_validate(json.loads(self.answer), context={"lenient": True})
            except ValueError:
                answer = None
        return AdviceInfo(
            id=self.id,
            run_id=self.run_id,
            finding_id=self.finding_id,
            trigger=self.trigger,
            question=self.question,
            status=self.status,
            source=self.source,
            model=self.model,
            answer=answer,
            error=self.error,
            context_tokens=self.context_tokens,
            created_at=_aware(self.created_at),
            answered_at=_aware(self.answered_at),
            latency_s=self.latency_s,
            context=self.context if include_context else None,
        )


class ActionRow(SQLModel, table=True):
    __tablename__ = "monitor_action"

    id: str = Field(primary_key=True, max_length=32)
    run_id: str = Field(max_length=128)
    finding_id: str | None = Field(default=None, max_length=32)
    action: str = Field(max_length=16)
    status: str = Field(max_length=16)  # pending | sent | skipped
    detail: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    done_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))


class AdviceStore:
    def __init__(self, engine: Any) -> None:
        self.engine = engine

    # ------------------------------------------------------------------ advice
    def add(self, row: AdviceRow) -> bool:
        """Store a new advice row; False when one with its id exists already."""
        try:
            with session(self.engine) as s:
                if s.get(AdviceRow, row.id) is not None:
                    return False
                s.add(row)
                s.flush()
        except IntegrityError:
            return False
        return True

    def get(self, advice_id: str) -> AdviceRow | None:
        with session(self.engine) as s:
            return s.get(AdviceRow, advice_id)

    def of_run(self, run_id: str, *, limit: int = 20, advice_id: str | None = None) -> list[AdviceRow]:
        with session(self.engine) as s:
            q = select(AdviceRow).where(col(AdviceRow.run_id) == run_id)
            if advice_id:
                q = q.where(col(AdviceRow.id) == advice_id)
            q = q.order_by(col(AdviceRow.created_at).desc(), col(AdviceRow.id)).limit(limit)
            return list(s.exec(q).all())

    def for_findings(self, finding_ids: list[str]) -> dict[str, AdviceRow]:
        if not finding_ids:
            return {}
        with session(self.engine) as s:
            q = select(AdviceRow).where(col(AdviceRow.finding_id).in_(finding_ids))
            return {r.finding_id: r for r in s.exec(q).all() if r.finding_id}

    def count_since(self, run_id: str, since: datetime, *, on_demand: bool) -> int:
        with session(self.engine) as s:
            q = (
                select(func.count())
                .select_from(AdviceRow)
                .where(
                    col(AdviceRow.run_id) == run_id,
                    col(AdviceRow.created_at) >= since,
                    col(AdviceRow.status) != "rate_limited",
                )
            )
            q = (
                q.where(col(AdviceRow.trigger) == "on_demand")
                if on_demand
                else q.where(col(AdviceRow.trigger) != "on_demand")
            )
            return int(s.exec(q).one())

    def pending_on_demand(self, run_id: str, question: str | None) -> AdviceRow | None:
        with session(self.engine) as s:
            q = select(AdviceRow).where(
                col(AdviceRow.run_id) == run_id,
                col(AdviceRow.trigger) == "on_demand",
                col(AdviceRow.status) == "pending",
            )
            for row in s.exec(q).all():
                if (row.question or "") == (question or ""):
                    return row
            return None

    def claimable(self, now: datetime, limit: int = 20) -> list[str]:
        """Pending advice nobody holds (no lease, or one that expired): ids, oldest first."""
        with session(self.engine) as s:
            q = (
                select(AdviceRow.id)
                .where(col(AdviceRow.status) == "pending")
                .where((col(AdviceRow.lease_until).is_(None)) | (col(AdviceRow.lease_until) < now))
                .order_by(col(AdviceRow.created_at))
                .limit(limit)
            )
            return list(s.exec(q).all())

    def claim(self, advice_id: str, lease_s: float) -> AdviceRow | None:
        """Take the lease on a pending row (guarded); the row, or None when someone else holds it."""
        now = utcnow()
        with session(self.engine) as s:
            res = s.execute(
                update(AdviceRow)
                .where(
                    col(AdviceRow.id) == advice_id,
                    col(AdviceRow.status) == "pending",
                    (col(AdviceRow.lease_until).is_(None)) | (col(AdviceRow.lease_until) < now),
                )
                .values(lease_until=now + timedelta(seconds=lease_s), tries=AdviceRow.tries + 1)
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                return None
        return self.get(advice_id)

    def save_context(self, advice_id: str, context: str, tokens: int) -> None:
        with session(self.engine) as s:
            s.execute(
                update(AdviceRow).where(col(AdviceRow.id) == advice_id).values(context=context, context_tokens=tokens)
            )

    def finish(
        self,
        advice_id: str,
        *,
        status: str,
        source: str,
        answer: AdviceAnswer | None,
        error: str | None,
        model: str | None,
        latency_s: float | None,
    ) -> bool:
        """Store the outcome of a pending row (guarded: a row already finished stays as it is)."""
        with session(self.engine) as s:
            res = s.execute(
                update(AdviceRow)
                .where(col(AdviceRow.id) == advice_id, col(AdviceRow.status) == "pending")
                .values(
                    status=status,
                    source=source,
                    answer=answer.model_dump_json() if answer is not None else None,
                    error=error,
                    model=model,
                    latency_s=latency_s,
                    answered_at=utcnow(),
                    lease_until=None,
                )
            )
            return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ actions
    def begin_action(self, row: ActionRow) -> ActionRow:
        """The action's row: the stored one when it exists, else ``row`` stored now."""
        try:
            with session(self.engine) as s:
                old = s.get(ActionRow, row.id)
                if old is not None:
                    return old
                s.add(row)
                s.flush()
                s.refresh(row)
                return row
        except IntegrityError:
            stored = self.action(row.id)
            assert stored is not None
            return stored

    def action(self, action_id: str) -> ActionRow | None:
        with session(self.engine) as s:
            return s.get(ActionRow, action_id)

    def finish_action(self, action_id: str, status: str, detail: str | None = None) -> None:
        with session(self.engine) as s:
            s.execute(
                update(ActionRow)
                .where(col(ActionRow.id) == action_id)
                .values(status=status, detail=detail, done_at=utcnow())
            )

    def actions(self, run_id: str) -> list[ActionRow]:
        with session(self.engine) as s:
            q = select(ActionRow).where(col(ActionRow.run_id) == run_id).order_by(col(ActionRow.created_at))
            return list(s.exec(q).all())

    # ------------------------------------------------------------------ policy
    def policy(self, run_id: str) -> str | None:
        with session(self.engine) as s:
            row = s.get(RunRow, run_id)
            return row.policy if row is not None else None

    def set_policy(self, run_id: str, policy: str | None) -> None:
        """Store a run's policy (before or during the run). Not part of the watch's state: the
        version stays, so a handler's guarded update of the same row is not disturbed."""
        now = utcnow()
        for _ in range(3):
            try:
                with session(self.engine) as s:
                    row = s.get(RunRow, run_id)
                    if row is None:
                        s.add(RunRow(run_id=run_id, version=1, policy=policy, updated_at=now))
                    else:
                        s.execute(update(RunRow).where(col(RunRow.run_id) == run_id).values(policy=policy))
                return
            except IntegrityError:
                continue
        raise RuntimeError(f"could not store the policy of {run_id}")


def since(hours: float) -> datetime:
    return datetime.now(timezone.utc) - timedelta(hours=hours)
