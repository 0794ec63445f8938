"""The api service's database work, synchronous (routers call it in a worker thread).

Users and tokens, the gateway's record of submitted runs, the run-state read model, and the
logs and metrics store. Ingest inserts a whole fetched batch of messages in one transaction
with ``INSERT ... ON CONFLICT DO NOTHING`` on the (run, attempt, seq[, key]) keys, so a
redelivered or replayed batch changes nothing.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from choline_core.errors import Conflict, Forbidden, NotFound
from choline_core.events import RunSpec, RunState

from .models import (
    LogLineRow,
    MetricPointRow,
    RunRow,
    RunStateRow,
    TokenRow,
    UserRow,
    aware,
    utcnow,
)

TOKEN_PREFIX = "chl_"
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"  # base32, lower case: URL- and subject-safe
LAST_USED_EVERY_S = 60.0


def new_id(prefix: str, n: int = 10) -> str:
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(n))


def new_run_id() -> str:
    """``r`` + 10 base32 characters (50 random bits): short, URL-safe, a valid subject token."""
    return new_id("r")


def hash_token(token: str) -> str:
    """Tokens carry 256 random bits, so a plain sha256 is enough (no salt or stretching needed)."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the user and the token they used."""

    user: str
    admin: bool
    token_id: str
    token_name: str


@dataclass(frozen=True)
class LocalRun:
    run_id: str
    owner: str
    name: str | None
    spec: RunSpec
    created_at: datetime
    state: RunState | None  # last heard on the run events stream; None = the provisioner never spoke
    reason: str | None
    updated_at: datetime | None


class ApiStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._log_table: sa.Table = LogLineRow.__table__  # type: ignore[attr-defined]
        self._metric_table: sa.Table = MetricPointRow.__table__  # type: ignore[attr-defined]  # writes: metrics.py
        self._state_table: sa.Table = RunStateRow.__table__  # type: ignore[attr-defined]

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True
        except Exception:
            return False

    # ------------------------------------------------------------------ users and tokens
    def has_users(self) -> bool:
        with Session(self.engine) as s:
            return s.exec(select(UserRow.id).limit(1)).first() is not None

    def bootstrap_admin(self, token: str | None = None) -> str | None:
        """Create the ``admin`` user and a token when no user exists; return that token (else None).

        Two replicas starting together race on the user's primary key: one wins, the other
        returns None.
        """
        if self.has_users():
            return None
        token = token or new_token()
        now = utcnow()
        try:
            with Session(self.engine) as s:
                s.add(UserRow(id="admin", is_admin=True, created_at=now))
                s.flush()
                s.add(_token_row("admin", "admin (created at first start)", token, now))
                s.commit()
        except IntegrityError:
            return None
        return token

    def authenticate(self, token: str) -> Principal | None:
        """The principal for a bearer token, or None when it is unknown or revoked."""
        digest = hash_token(token)
        with Session(self.engine) as s:
            row = s.exec(
                select(TokenRow, UserRow)
                .join(UserRow, UserRow.id == TokenRow.user_id)  # type: ignore[arg-type]
                .where(TokenRow.token_hash == digest, TokenRow.revoked_at.is_(None))  # type: ignore[union-attr]
            ).first()
            if row is None:
                return None
            tok, user = row
            now = utcnow()
            last = aware(tok.last_used_at)
            if last is None or (now - last).total_seconds() > LAST_USED_EVERY_S:
                s.execute(sa.update(TokenRow).where(TokenRow.id == tok.id).values(last_used_at=now))  # type: ignore[arg-type]
                s.commit()
            return Principal(user=user.id, admin=user.is_admin, token_id=tok.id, token_name=tok.name)

    def principal_for_token_id(self, token_id: str) -> Principal | None:
        """The principal of an active token, by its id (stream tokens name the token they came from)."""
        with Session(self.engine) as s:
            row = s.exec(
                select(TokenRow, UserRow)
                .join(UserRow, UserRow.id == TokenRow.user_id)  # type: ignore[arg-type]
                .where(TokenRow.id == token_id, TokenRow.revoked_at.is_(None))  # type: ignore[union-attr]
            ).first()
        if row is None:
            return None
        tok, user = row
        return Principal(user=user.id, admin=user.is_admin, token_id=tok.id, token_name=tok.name)

    def create_token(
        self, caller: Principal, name: str, user: str | None = None, admin: bool = False
    ) -> tuple[TokenRow, str]:
        """A new token for ``user`` (default: the caller). Only an admin names another user, which
        creates that user when new (an admin one if ``admin``)."""
        target = user or caller.user
        if (target != caller.user or admin) and not caller.admin:
            raise Forbidden("only an admin can create tokens for other users or make admins")
        token = new_token()
        now = utcnow()
        with Session(self.engine) as s:
            existing = s.get(UserRow, target)
            if existing is None:
                s.add(UserRow(id=target, is_admin=admin, created_at=now))
            elif admin and not existing.is_admin:
                raise Conflict(f"user {target!r} exists and is not an admin", hint="create the admin under a new name")
            row = _token_row(target, name, token, now)
            s.add(row)
            s.commit()
            s.refresh(row)
        return row, token

    def list_tokens(self, caller: Principal, *, all_users: bool = False) -> list[TokenRow]:
        with Session(self.engine) as s:
            q = select(TokenRow).where(TokenRow.revoked_at.is_(None))  # type: ignore[union-attr]
            if not (all_users and caller.admin):
                q = q.where(TokenRow.user_id == caller.user)
            return list(s.exec(q.order_by(TokenRow.created_at)).all())  # type: ignore[arg-type]

    def revoke_token(self, caller: Principal, token_id: str) -> TokenRow:
        with Session(self.engine) as s:
            row = s.get(TokenRow, token_id)
            if row is None or row.revoked_at is not None or (row.user_id != caller.user and not caller.admin):
                raise NotFound(f"no token {token_id!r}", hint="see 'choline tokens ls'")
            user = s.get(UserRow, row.user_id)
            if user is not None and user.is_admin:
                others = s.exec(
                    select(sa.func.count())
                    .select_from(TokenRow)
                    .join(UserRow, UserRow.id == TokenRow.user_id)  # type: ignore[arg-type]
                    .where(UserRow.is_admin, TokenRow.revoked_at.is_(None), TokenRow.id != token_id)  # type: ignore[arg-type, union-attr]
                ).one()
                if not others:
                    raise Conflict(
                        "that is the last admin token; revoking it would lock everyone out",
                        hint="create another admin token first ('choline tokens create NAME')",
                    )
            row.revoked_at = utcnow()
            s.add(row)
            s.commit()
            s.refresh(row)
            return row

    # ------------------------------------------------------------------ submitted runs
    def find_by_client_key(self, owner: str, client_key: str) -> LocalRun | None:
        with Session(self.engine) as s:
            row = s.exec(select(RunRow).where(RunRow.owner == owner, RunRow.client_key == client_key)).first()
            return self._local(s, row) if row else None

    def add_run(self, run_id: str, owner: str, spec: RunSpec, client_key: str | None = None) -> LocalRun:
        now = utcnow()
        row = RunRow(
            run_id=run_id,
            owner=owner,
            name=spec.name,
            spec=spec.model_dump_json(),
            client_key=client_key,
            created_at=now,
        )
        try:
            with Session(self.engine) as s:
                s.add(row)
                s.commit()
        except IntegrityError as exc:
            if client_key:
                found = self.find_by_client_key(owner, client_key)
                if found:
                    return found
            raise Conflict(f"run {run_id} exists") from exc
        return LocalRun(run_id, owner, spec.name, spec, now, None, None, None)

    def delete_run(self, run_id: str) -> None:
        with Session(self.engine) as s:
            s.execute(sa.delete(RunRow).where(RunRow.run_id == run_id))  # type: ignore[arg-type]
            s.commit()

    def get_run(self, run_id: str) -> LocalRun | None:
        with Session(self.engine) as s:
            row = s.get(RunRow, run_id)
            return self._local(s, row) if row else None

    def owner_of(self, run_id: str) -> str | None:
        with Session(self.engine) as s:
            return s.exec(select(RunRow.owner).where(RunRow.run_id == run_id)).first()

    def unseen_runs(
        self,
        owner: str | None,
        *,
        before: datetime | None,
        after: datetime | None,
        name: str | None,
        limit: int,
    ) -> list[LocalRun]:
        """Runs this gateway submitted that no run event has mentioned yet (newest first)."""
        with Session(self.engine) as s:
            q = (
                select(RunRow)
                .outerjoin(RunStateRow, RunStateRow.run_id == RunRow.run_id)  # type: ignore[arg-type]
                .where(RunStateRow.__table__.c.run_id.is_(None))  # type: ignore[attr-defined]
            )
            if owner is not None:
                q = q.where(RunRow.owner == owner)
            if before is not None:
                q = q.where(RunRow.created_at < before)
            if after is not None:
                q = q.where(RunRow.created_at >= after)
            if name:
                q = q.where(RunRow.name.contains(name))  # type: ignore[union-attr]
            rows = s.exec(q.order_by(RunRow.created_at.desc()).limit(limit)).all()  # type: ignore[attr-defined]
            return [self._local(s, r) for r in rows]

    def _local(self, s: Session, row: RunRow) -> LocalRun:
        st = s.get(RunStateRow, row.run_id)
        return LocalRun(
            run_id=row.run_id,
            owner=row.owner,
            name=row.name,
            spec=RunSpec.model_validate_json(row.spec, context={"lenient": True}),
            created_at=aware(row.created_at) or row.created_at,
            state=RunState(st.state) if st else None,
            reason=st.reason if st else None,
            updated_at=aware(st.updated_at) if st else None,
        )

    # ------------------------------------------------------------------ run states
    def apply_state(
        self,
        run_id: str,
        state: RunState,
        reason: str | None,
        attempt: int | None,
        ts: datetime,
        *,
        on_transition: Callable[[Session, str], None] | None = None,
    ) -> tuple[bool, str | None]:
        """Record a run's state unless a newer event already did. Returns whether it changed and the
        webhook event it stands for (``run.started``, ``run.recovered``, ...); ``on_transition``
        (the webhook outbox) is called with that event inside the same transaction."""
        from .webhooks import run_transition

        with Session(self.engine) as s:
            row = s.get(RunStateRow, run_id, with_for_update=True)
            if row is None:
                row = RunStateRow(run_id=run_id, state=state.value, reason=reason, attempt=attempt, updated_at=ts)
                ever, recovering = False, False
            else:
                if (aware(row.updated_at) or ts) > ts:
                    return False, None
                ever, recovering = row.ever_running, row.recovering
                row.state, row.reason, row.attempt, row.updated_at = state.value, reason, attempt, ts
            kind = run_transition(state.value, ever_running=ever, recovering=recovering)
            if state == RunState.running:
                row.ever_running, row.recovering = True, False
            elif state == RunState.recovering:
                row.recovering = True
            elif state == RunState.paused or state.terminal:
                row.recovering = False
            s.add(row)
            if kind is not None and on_transition is not None:
                on_transition(s, kind)
            try:
                s.commit()
            except IntegrityError:  # another replica inserted it first: apply again as an update
                s.rollback()
                return self.apply_state(run_id, state, reason, attempt, ts, on_transition=on_transition)
            return True, kind

    def run_state(self, run_id: str) -> tuple[RunState | None, str | None]:
        with Session(self.engine) as s:
            row = s.get(RunStateRow, run_id)
            return (RunState(row.state), row.reason) if row else (None, None)

    # ------------------------------------------------------------------ logs
    def insert_log_lines(self, rows: Sequence[dict[str, Any]]) -> int:
        """Insert log lines in one transaction; duplicates (run, attempt, seq) are skipped. Returns
        how many rows were offered (the database decides which were new)."""
        return self._insert_ignoring(self._log_table, LOG_COLUMNS, ("run_id", "attempt", "seq"), rows)

    def _insert_ignoring(
        self, table: sa.Table, columns: tuple[str, ...], key: tuple[str, ...], rows: Sequence[dict[str, Any]]
    ) -> int:
        """``executemany`` straight through the driver (the ingest hot path: SQLAlchemy's per-row
        statement processing costs as much as SQLite itself), ``ON CONFLICT DO NOTHING`` on ``key``."""
        if not rows:
            return 0
        sqlite = self.engine.dialect.name == "sqlite"
        marks = ", ".join(["?" if sqlite else "%s"] * len(columns))
        verb = "INSERT OR IGNORE INTO" if sqlite else "INSERT INTO"
        tail = "" if sqlite else f" ON CONFLICT ({', '.join(key)}) DO NOTHING"
        sql = f"{verb} {table.name} ({', '.join(columns)}) VALUES ({marks}){tail}"
        if sqlite:  # stored as SQLAlchemy stores them there: UTC wall time text, booleans as 0/1
            params = [tuple(_sqlite_value(r[c]) for c in columns) for r in rows]
        else:
            params = [tuple(r[c] for c in columns) for r in rows]
        with self.engine.begin() as conn:
            conn.exec_driver_sql(sql, params)  # type: ignore[arg-type]
        return len(rows)

    def log_lines(
        self,
        run_id: str,
        *,
        attempt: int | None = None,
        after_attempt: int | None = None,
        after_seq: int | None = None,
        limit: int = 1000,
    ) -> list[LogLineRow]:
        """Lines in (attempt, seq) order, after the cursor (after_attempt, after_seq)."""
        t = self._log_table
        q = sa.select(t).where(t.c.run_id == run_id)
        if attempt is not None:
            q = q.where(t.c.attempt == attempt)
            if after_seq is not None:
                q = q.where(t.c.seq > after_seq)
        elif after_seq is not None or after_attempt is not None:
            a = after_attempt if after_attempt is not None else 0
            s = after_seq if after_seq is not None else -1
            q = q.where(sa.or_(t.c.attempt > a, sa.and_(t.c.attempt == a, t.c.seq > s)))
        q = q.order_by(t.c.attempt, t.c.seq).limit(limit)
        with self.engine.connect() as conn:
            return [LogLineRow.model_validate(_utc_row(r._mapping)) for r in conn.execute(q)]

    def log_lines_after_id(self, run_id: str, after_id: int, limit: int = 1000) -> list[LogLineRow]:
        """Lines in the order they were stored, after row ``after_id`` (the follow cursor)."""
        t = self._log_table
        q = sa.select(t).where(t.c.run_id == run_id, t.c.id > after_id).order_by(t.c.id).limit(limit)
        with self.engine.connect() as conn:
            return [LogLineRow.model_validate(_utc_row(r._mapping)) for r in conn.execute(q)]

    # ------------------------------------------------------------------ metrics
    def metric_points(
        self,
        run_id: str,
        *,
        keys: Iterable[str] = (),
        attempt: int | None = None,
        include_superseded: bool = False,
        after_step: int | None = None,
        limit: int = 10000,
    ) -> list[MetricPointRow]:
        t = self._metric_table
        q = sa.select(t).where(t.c.run_id == run_id)
        keys = list(keys)
        if keys:
            q = q.where(t.c.key.in_(keys))
        if attempt is not None:
            q = q.where(t.c.attempt == attempt)
        if not include_superseded:
            q = q.where(t.c.superseded == sa.false())
        if after_step is not None:
            q = q.where(t.c.step > after_step)
        q = q.order_by(t.c.step, t.c.key, t.c.attempt, t.c.seq).limit(limit)
        with self.engine.connect() as conn:
            return [MetricPointRow.model_validate(_utc_row(r._mapping)) for r in conn.execute(q)]


LOG_COLUMNS = ("run_id", "attempt", "seq", "ts", "stream", "text")


def _sqlite_value(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(timezone.utc)
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, bool):
        return int(value)
    return value


def _utc_row(mapping: Any) -> dict[str, Any]:
    row = dict(mapping)
    row["ts"] = aware(row.get("ts"))
    return row


def _token_row(user: str, name: str, token: str, now: datetime) -> TokenRow:
    return TokenRow(
        id=new_id("t", 10),
        user_id=user,
        name=name,
        token_hash=hash_token(token),
        prefix=token[: len(TOKEN_PREFIX) + 4],
        created_at=now,
    )
