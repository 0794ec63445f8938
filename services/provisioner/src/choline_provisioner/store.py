"""Database access for the provisioner: loads and guarded updates, nothing else.

Every write of a state goes through ``update_run``/``update_box`` with the version read
before: ``UPDATE ... SET ..., version = version + 1 WHERE id = ? AND version = ?``. A stale
writer (a redelivered message, a second replica, a provisioner restarted mid-step) updates
nothing and gets ``False``; it reloads and decides again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from choline_core.events import RunSpec, RunState

from .models import Attempt, Box, Run, Schedule, now, utc

ACTIVE_STATES = [s.value for s in RunState if not s.terminal]
LIVE_BOX_STATES = ["creating", "created", "booted", "ready", "releasing"]


class Store:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # ------------------------------------------------------------------ runs
    def insert_run(self, run_id: str, owner: str, spec: RunSpec, state: RunState) -> bool:
        """Insert a new run; ``False`` if it already exists (a redelivered request)."""
        with self.session() as s:
            if s.get(Run, run_id) is not None:
                return False
            s.add(
                Run(
                    id=run_id,
                    owner=owner,
                    name=spec.name,
                    spec_json=spec.model_dump_json(),
                    state=state.value,
                    start_at=utc(spec.start_at),
                )
            )
            if state is RunState.scheduled:
                s.add(
                    Schedule(
                        run_id=run_id,
                        start_at=utc(spec.start_at),
                        max_price=spec.max_price,
                    )
                )
            s.commit()
        return True

    def run(self, run_id: str) -> Run | None:
        with self.session() as s:
            return s.get(Run, run_id)

    def update_run(self, run: Run, **values: Any) -> bool:
        values.setdefault("updated_at", now())
        with self.session() as s:
            res = s.execute(
                update(Run)
                .where(col(Run.id) == run.id, col(Run.version) == run.version)
                .values(**values, version=run.version + 1)
            )
            s.commit()
        if res.rowcount != 1:  # type: ignore[attr-defined]
            return False
        for k, v in values.items():
            setattr(run, k, v)
        run.version += 1
        return True

    def active_runs(self) -> list[Run]:
        with self.session() as s:
            return list(s.exec(select(Run).where(col(Run.state).in_(ACTIVE_STATES))))

    def list_runs(
        self, *, owner: str | None, states: Iterable[str], name: str | None, limit: int, before: datetime | None
    ) -> list[Run]:
        with self.session() as s:
            q = select(Run)
            if owner:
                q = q.where(col(Run.owner) == owner)
            states = list(states)
            if states:
                q = q.where(col(Run.state).in_(states))
            if name:
                q = q.where(col(Run.name).contains(name))
            if before:
                q = q.where(col(Run.created_at) < utc(before))
            q = q.order_by(col(Run.created_at).desc()).limit(limit)
            return list(s.exec(q))

    def claim(self, run: Run, owner: str, lease: timedelta) -> bool:
        """Take or renew the run's lease (one replica drives a run at a time)."""
        t = now()
        with self.session() as s:
            res = s.execute(
                update(Run)
                .where(
                    col(Run.id) == run.id,
                    or_(col(Run.lease_owner).is_(None), col(Run.lease_owner) == owner, col(Run.lease_until) < t),
                )
                .values(lease_owner=owner, lease_until=t + lease)
            )
            s.commit()
        return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    def lost_hosts(self, run: Run) -> list[str]:
        return list(json.loads(run.lost_hosts or "[]"))

    # ------------------------------------------------------------------ attempts
    def add_attempt(self, run_id: str, n: int) -> Attempt:
        with self.session() as s:
            existing = s.exec(select(Attempt).where(col(Attempt.run_id) == run_id, col(Attempt.n) == n)).first()
            if existing:
                return existing
            att = Attempt(run_id=run_id, n=n)
            s.add(att)
            s.commit()
            s.refresh(att)
            return att

    def attempt(self, run_id: str, n: int) -> Attempt | None:
        with self.session() as s:
            return s.exec(select(Attempt).where(col(Attempt.run_id) == run_id, col(Attempt.n) == n)).first()

    def attempts(self, run_id: str) -> list[Attempt]:
        with self.session() as s:
            return list(s.exec(select(Attempt).where(col(Attempt.run_id) == run_id).order_by(col(Attempt.n))))

    def update_attempt(self, run_id: str, n: int, **values: Any) -> None:
        with self.session() as s:
            s.execute(update(Attempt).where(col(Attempt.run_id) == run_id, col(Attempt.n) == n).values(**values))
            s.commit()

    def end_attempt(self, run_id: str, n: int, **values: Any) -> bool:
        """End an attempt once: ``False`` when it had already ended (a duplicate end)."""
        values.setdefault("ended_at", now())
        with self.session() as s:
            res = s.execute(
                update(Attempt)
                .where(col(Attempt.run_id) == run_id, col(Attempt.n) == n, col(Attempt.ended_at).is_(None))
                .values(**values)
            )
            s.commit()
        return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ boxes
    def add_box(self, box: Box) -> Box:
        with self.session() as s:
            existing = s.exec(select(Box).where(col(Box.run_id) == box.run_id, col(Box.attempt) == box.attempt)).first()
            if existing:
                return existing
            s.add(box)
            s.commit()
            s.refresh(box)
            return box

    def box(self, box_id: str) -> Box | None:
        with self.session() as s:
            return s.get(Box, box_id)

    def box_for(self, run_id: str, attempt: int) -> Box | None:
        with self.session() as s:
            return s.exec(select(Box).where(col(Box.run_id) == run_id, col(Box.attempt) == attempt)).first()

    def update_box(self, box: Box, **values: Any) -> bool:
        with self.session() as s:
            res = s.execute(
                update(Box)
                .where(col(Box.id) == box.id, col(Box.version) == box.version)
                .values(**values, version=box.version + 1)
            )
            s.commit()
        if res.rowcount != 1:  # type: ignore[attr-defined]
            return False
        for k, v in values.items():
            setattr(box, k, v)
        box.version += 1
        return True

    def touch_box(self, box_id: str, **values: Any) -> None:
        """Unguarded bookkeeping (heartbeat times); never a state."""
        with self.session() as s:
            s.execute(update(Box).where(col(Box.id) == box_id).values(**values))
            s.commit()

    def live_boxes(self) -> list[Box]:
        with self.session() as s:
            return list(s.exec(select(Box).where(col(Box.state).in_(LIVE_BOX_STATES))))

    def boxes(self, *, include_destroyed: bool, run_ids: Iterable[str] | None = None) -> list[Box]:
        with self.session() as s:
            q = select(Box)
            if not include_destroyed:
                q = q.where(col(Box.state).in_(LIVE_BOX_STATES))
            if run_ids is not None:
                q = q.where(col(Box.run_id).in_(list(run_ids)))
            return list(s.exec(q.order_by(col(Box.created_at).desc())))

    # ------------------------------------------------------------------ schedules
    def schedule(self, run_id: str) -> Schedule | None:
        with self.session() as s:
            return s.get(Schedule, run_id)

    def delete_schedule(self, run_id: str) -> None:
        with self.session() as s:
            sched = s.get(Schedule, run_id)
            if sched:
                s.delete(sched)
                s.commit()


def box_cost(box: Box, until: datetime | None = None) -> float:
    """$/h x hours from creation to destruction (or ``until``, default now)."""
    end = box.destroyed_at or until or now()
    hours = max(0.0, (end - box.created_at).total_seconds() / 3600)
    return round(box.price_per_hour * hours, 6)
