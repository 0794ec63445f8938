"""The metrics store: points, their rollups, superseded history, and chart queries that stay fast.

**Points** (``api_metric_point``) are unique on (run, attempt, seq, key): a replay hours later
changes nothing. A point of attempt *i* is **superseded** when a later attempt *j* resumed from a
step before it (``step > r_j``): kept for audit, never shown as the run's history. Attempts'
resume steps are remembered (``api_attempt``) so a point is superseded whether it arrives before
or after the ``AttemptStarted`` event that supersedes it.

**Rollups** (``api_metric_rollup``): for each (run, key) and each resolution of 16, 256, 4096 and
65536 steps, one row per bucket with the count, the count of non-finite values, min, max, first
step and the last point (by step, attempt, seq). Only non-superseded points count. They are kept
in the ingest transaction: the batch's new points are aggregated in Python to the 16-step buckets,
those to 256, and so on (each level is 16 times smaller), then upserted (merging min/max/last/count
with what the row holds). Exactly the new points count, so a duplicate never counts twice: the
batch's (run, attempt, seq) ranges are looked up first, under the writer lock (SQLite ``BEGIN
IMMEDIATE``; a per-run advisory lock on PostgreSQL).

**Rebuild** when an attempt supersedes points: per key, one indexed ``UPDATE`` marks them, then
the buckets from the resume step on are recomputed: the finest from the raw points after it, each
coarser one from the finer level's fresh rows. The cost is proportional to the superseded range
(usually the steps since the last checkpoint), never to the run's whole history.

**Series query**: the coarsest level that still gives at least ``max_points`` buckets in the
range, merged down to at most ``max_points`` (min of mins, max of maxes, so spikes survive), with
the two edge buckets recomputed from raw points when the range cuts through them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Engine

SHIFTS = (4, 6, 8, 10, 12, 14, 16)  # rollup resolutions: 16, 64, 256, ... 65536 steps per bucket
RESOLUTIONS = tuple(1 << s for s in SHIFTS)

# a rollup aggregate, as a list (hot path): indexes into it
N, NONFINITE, VMIN, VMAX, FIRST, LSTEP, LATT, LSEQ, LVAL, LRAW = range(10)

POINT_COLUMNS = ("run_id", "key", "attempt", "seq", "step", "value", "raw", "ts", "epoch", "superseded")
ROLLUP_COLUMNS = (
    "run_id",
    "key",
    "res",
    "bucket",
    "n",
    "nonfinite",
    "vmin",
    "vmax",
    "first_step",
    "last_step",
    "last_attempt",
    "last_seq",
    "last_value",
    "last_raw",
)


def _pick(cur: Any, new: Any, *, lower: bool) -> str:
    return (
        f"CASE WHEN {new} IS NULL THEN {cur} WHEN {cur} IS NULL OR {new} {'<' if lower else '>'} {cur} "
        f"THEN {new} ELSE {cur} END"
    )


_T = "api_metric_rollup"
_NEWER = (
    f"(excluded.last_step, excluded.last_attempt, excluded.last_seq) "
    f"> ({_T}.last_step, {_T}.last_attempt, {_T}.last_seq)"
)
UPSERT_ROLLUP = (
    f"INSERT INTO {_T} ({', '.join(ROLLUP_COLUMNS)}) VALUES ({', '.join('?' * len(ROLLUP_COLUMNS))}) "
    f"ON CONFLICT (run_id, key, res, bucket) DO UPDATE SET "
    f"n = {_T}.n + excluded.n, "
    f"nonfinite = {_T}.nonfinite + excluded.nonfinite, "
    f"vmin = {_pick(f'{_T}.vmin', 'excluded.vmin', lower=True)}, "
    f"vmax = {_pick(f'{_T}.vmax', 'excluded.vmax', lower=False)}, "
    f"first_step = CASE WHEN excluded.first_step < {_T}.first_step THEN excluded.first_step ELSE {_T}.first_step END, "
    f"last_value = CASE WHEN {_NEWER} THEN excluded.last_value ELSE {_T}.last_value END, "
    f"last_raw = CASE WHEN {_NEWER} THEN excluded.last_raw ELSE {_T}.last_raw END, "
    f"last_attempt = CASE WHEN {_NEWER} THEN excluded.last_attempt ELSE {_T}.last_attempt END, "
    f"last_seq = CASE WHEN {_NEWER} THEN excluded.last_seq ELSE {_T}.last_seq END, "
    f"last_step = CASE WHEN {_NEWER} THEN excluded.last_step ELSE {_T}.last_step END"
)


# =============================================================================================
# Aggregates (plain lists: this runs once per ingested point)
# =============================================================================================
def add_point(aggs: dict[Any, list[Any]], k: Any, step: int, attempt: int, seq: int, value: Any, raw: Any) -> None:
    a = aggs.get(k)
    if a is None:
        aggs[k] = [1, 1 if value is None else 0, value, value, step, step, attempt, seq, value, raw]
        return
    a[N] += 1
    if value is None:
        a[NONFINITE] += 1
    else:
        if a[VMIN] is None or value < a[VMIN]:
            a[VMIN] = value
        if a[VMAX] is None or value > a[VMAX]:
            a[VMAX] = value
    if step < a[FIRST]:
        a[FIRST] = step
    if (step, attempt, seq) > (a[LSTEP], a[LATT], a[LSEQ]):
        a[LSTEP], a[LATT], a[LSEQ], a[LVAL], a[LRAW] = step, attempt, seq, value, raw


def aggregate(points: list[tuple[Any, ...]]) -> list[Any]:
    """One bucket's aggregate from its points ``(step, attempt, seq, value, raw)``, in C builtins
    (min/max over lists and tuples) rather than a comparison per point in Python."""
    values = [t[3] for t in points if t[3] is not None]
    last = max(points)  # (step, attempt, seq) is unique within a bucket: the value never decides
    return [
        len(points),
        len(points) - len(values),
        min(values) if values else None,
        max(values) if values else None,
        min(points)[0],
        last[0],
        last[1],
        last[2],
        last[3],
        last[4],
    ]


def merge(aggs: dict[Any, list[Any]], k: Any, b: Sequence[Any]) -> None:
    a = aggs.get(k)
    if a is None:
        aggs[k] = list(b)
        return
    a[N] += b[N]
    a[NONFINITE] += b[NONFINITE]
    if b[VMIN] is not None and (a[VMIN] is None or b[VMIN] < a[VMIN]):
        a[VMIN] = b[VMIN]
    if b[VMAX] is not None and (a[VMAX] is None or b[VMAX] > a[VMAX]):
        a[VMAX] = b[VMAX]
    if b[FIRST] < a[FIRST]:
        a[FIRST] = b[FIRST]
    if (b[LSTEP], b[LATT], b[LSEQ]) > (a[LSTEP], a[LATT], a[LSEQ]):
        a[LSTEP], a[LATT], a[LSEQ], a[LVAL], a[LRAW] = b[LSTEP], b[LATT], b[LSEQ], b[LVAL], b[LRAW]


def coarser(fine: dict[tuple[str, str, int], list[Any]], by: int) -> dict[tuple[str, str, int], list[Any]]:
    """Aggregates of (run, key, bucket) merged into buckets ``2**by`` times wider."""
    out: dict[tuple[str, str, int], list[Any]] = {}
    for (run_id, key, bucket), a in fine.items():
        merge(out, (run_id, key, bucket >> by), a)
    return out


# =============================================================================================
# Results
# =============================================================================================
@dataclass
class Series:
    """Columnar, one entry per bucket (``resolution`` = 1: one per point)."""

    resolution: int
    source: str
    start: int | None
    end: int | None
    step: list[int] = field(default_factory=list)
    last_step: list[int] = field(default_factory=list)
    min: list[float | None] = field(default_factory=list)
    max: list[float | None] = field(default_factory=list)
    last: list[float | None] = field(default_factory=list)
    count: list[int] = field(default_factory=list)
    nonfinite: list[int] = field(default_factory=list)

    def append(self, a: Sequence[Any]) -> None:
        self.step.append(a[FIRST])
        self.last_step.append(a[LSTEP])
        self.min.append(a[VMIN])
        self.max.append(a[VMAX])
        self.last.append(a[LVAL])
        self.count.append(a[N])
        self.nonfinite.append(a[NONFINITE])


@dataclass
class IngestResult:
    offered: int
    stored: int
    superseded: int


def _sqlite_ts(value: datetime) -> str:
    """UTC wall time as SQLAlchemy stores it in SQLite (``YYYY-MM-DD HH:MM:SS.ffffff``)."""
    if value.tzinfo is not None:
        offset = value.utcoffset()
        value = (value - offset if offset else value).replace(tzinfo=None)
    return value.isoformat(" ", "microseconds")


class MetricStore:
    """Synchronous (callers use a worker thread); talks to the driver directly on the hot paths."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"

    # ------------------------------------------------------------------ plumbing
    def q(self, sql: str) -> str:
        return sql if self.sqlite else sql.replace("?", "%s")

    def _begin(self, cur: Any, run_ids: Iterable[str]) -> None:
        """Take the writer lock for these runs: ingest, supersede and rebuild never interleave."""
        if self.sqlite:
            cur.execute("BEGIN IMMEDIATE")
        else:
            for run_id in sorted(set(run_ids)):
                cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("api-metrics:" + run_id,))

    def _conn(self) -> Any:
        conn = self.engine.raw_connection()
        if self.sqlite and conn.in_transaction:  # type: ignore[attr-defined]
            conn.rollback()
        return conn

    # ------------------------------------------------------------------ ingest
    def ingest(self, batches: Sequence[tuple[str, int, Sequence[Any]]]) -> IngestResult:
        """Store ``(run_id, attempt, points)`` batches (points with seq, step, key, value, raw, ts,
        epoch) in one transaction, and fold the new, non-superseded ones into the rollups."""
        offered = sum(len(p) for _, _, p in batches)
        if not offered:
            return IngestResult(0, 0, 0)
        conn = self._conn()
        try:
            cur = conn.cursor()
            self._begin(cur, (b[0] for b in batches))
            starts = self._starts(cur, {b[0] for b in batches})
            rows: list[tuple[Any, ...]] = []
            groups: dict[tuple[str, str, int], list[tuple[Any, ...]]] = {}
            earlier: dict[tuple[str, int], list[tuple[int, int, Sequence[Any]]]] = {}
            superseded = 0
            sqlite = self.sqlite
            shift = SHIFTS[0]
            isfinite = math.isfinite
            for run_id, attempt, points in batches:
                if not points:
                    continue
                cutoff = self.cutoff(starts[run_id], attempt)
                seqs = [p.seq for p in points]
                lo, hi = min(seqs), max(seqs)
                cur.execute(
                    self.q(
                        "SELECT seq, key FROM api_metric_point WHERE run_id = ? AND attempt = ? AND seq BETWEEN ? AND ?"
                    ),
                    (run_id, attempt, lo, hi),
                )
                stored = {(seq, key) for seq, key in cur.fetchall()}
                before = earlier.setdefault((run_id, attempt), [])
                overlap = [g for a, b, g in before if not (hi < a or lo > b)]
                before.append((lo, hi, points))
                # the common case (a new batch, nothing replayed): no per-point duplicate check
                seen: set[tuple[int, str]] | None = None
                if stored or overlap or len(set(seqs)) != len(seqs):
                    seen = stored | {(p.seq, p.key[:200]) for g in overlap for p in g}
                for p in points:
                    key = p.key if len(p.key) <= 200 else p.key[:200]
                    if seen is not None:
                        if (p.seq, key) in seen:
                            continue
                        seen.add((p.seq, key))
                    value, raw = p.value, p.raw
                    if value is not None and not isfinite(value):
                        raw, value = ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")), None
                    elif raw:
                        raw = raw[:8]
                    step = p.step
                    sup = cutoff is not None and step > cutoff
                    rows.append(
                        (
                            run_id,
                            key,
                            attempt,
                            p.seq,
                            step,
                            value,
                            raw,
                            _sqlite_ts(p.ts) if sqlite else p.ts,
                            p.epoch,
                            int(sup) if sqlite else sup,
                        )
                    )
                    if sup:
                        superseded += 1
                        continue
                    k = (run_id, key, step >> shift)
                    g = groups.get(k)
                    if g is None:
                        groups[k] = [(step, attempt, p.seq, value, raw)]
                    else:
                        g.append((step, attempt, p.seq, value, raw))
            fine = {k: aggregate(g) for k, g in groups.items()}
            if rows:
                marks = ", ".join("?" * len(POINT_COLUMNS))
                verb = "INSERT OR IGNORE INTO" if sqlite else "INSERT INTO"
                tail = "" if sqlite else " ON CONFLICT (run_id, attempt, seq, key) DO NOTHING"
                cur.executemany(
                    self.q(f"{verb} api_metric_point ({', '.join(POINT_COLUMNS)}) VALUES ({marks}){tail}"), rows
                )
                self._upsert_levels(cur, fine)
            conn.commit()
            return IngestResult(offered, len(rows), superseded)
        except BaseException:
            conn.rollback()
            raise
        finally:
            conn.close()

    def _starts(self, cur: Any, run_ids: set[str]) -> dict[str, list[tuple[int, int]]]:
        """run -> [(attempt, resumed_from_step)] as the gateway heard them."""
        out: dict[str, list[tuple[int, int]]] = {}
        for run_id in run_ids:
            cur.execute(self.q("SELECT attempt, resumed_from_step FROM api_attempt WHERE run_id = ?"), (run_id,))
            out[run_id] = [(int(a), int(r)) for a, r in cur.fetchall()]
        return out

    @staticmethod
    def cutoff(starts: Sequence[tuple[int, int]], attempt: int) -> int | None:
        """The step after which ``attempt``'s points are superseded: min(r_j) over later attempts j."""
        later = [r for j, r in starts if j > attempt]
        return min(later) if later else None

    def _upsert_levels(self, cur: Any, fine: dict[tuple[str, str, int], list[Any]]) -> None:
        level = fine
        params: list[tuple[Any, ...]] = []
        for i, shift in enumerate(SHIFTS):
            if i:
                level = coarser(level, shift - SHIFTS[i - 1])
            res = 1 << shift
            params += [(run_id, key, res, bucket, *a) for (run_id, key, bucket), a in level.items()]
        cur.executemany(self.q(UPSERT_ROLLUP), params)

    # ------------------------------------------------------------------ attempts and superseded points
    def attempt_started(
        self, run_id: str, attempt: int, resumed_from_step: int, box_id: str | None, started_at: datetime
    ) -> int:
        """Remember where ``attempt`` resumed; mark the earlier attempts' points after that step
        superseded and rebuild the rollups from there. Idempotent. Returns the points marked."""
        conn = self._conn()
        try:
            cur = conn.cursor()
            self._begin(cur, [run_id])
            ts: Any = _sqlite_ts(started_at) if self.sqlite else started_at
            verb = "INSERT OR IGNORE INTO" if self.sqlite else "INSERT INTO"
            tail = "" if self.sqlite else " ON CONFLICT (run_id, attempt) DO NOTHING"
            cur.execute(
                self.q(
                    f"{verb} api_attempt (run_id, attempt, resumed_from_step, box_id, started_at) "
                    f"VALUES (?, ?, ?, ?, ?){tail}"
                ),
                (run_id, attempt, resumed_from_step, box_id, ts),
            )
            marked = 0
            true = 1 if self.sqlite else True
            for key in self._keys(cur, run_id):
                cur.execute(
                    self.q(
                        "UPDATE api_metric_point SET superseded = ? WHERE run_id = ? AND key = ? AND step > ? "
                        "AND attempt < ? AND superseded = ?"
                    ),
                    (true, run_id, key, resumed_from_step, attempt, 0 if self.sqlite else False),
                )
                n = cur.rowcount or 0
                if n > 0:
                    marked += n
                    self._rebuild(cur, run_id, key, resumed_from_step + 1)
            conn.commit()
            return marked
        except BaseException:
            conn.rollback()
            raise
        finally:
            conn.close()

    def _keys(self, cur: Any, run_id: str) -> list[str]:
        """Keys with non-superseded points: those in the coarsest rollup (a handful of rows)."""
        cur.execute(self.q(f"SELECT DISTINCT key FROM {_T} WHERE run_id = ? AND res = ?"), (run_id, RESOLUTIONS[-1]))
        return sorted(r[0] for r in cur.fetchall())

    def _rebuild(self, cur: Any, run_id: str, key: str, from_step: int) -> None:
        """Recompute the buckets of ``key`` that hold steps >= ``from_step``, at every level."""
        first = from_step >> SHIFTS[0]
        cur.execute(
            self.q(
                "SELECT step, attempt, seq, value, raw FROM api_metric_point "
                "WHERE run_id = ? AND key = ? AND step >= ? AND superseded = ?"
            ),
            (run_id, key, first << SHIFTS[0], 0 if self.sqlite else False),
        )
        level: dict[tuple[str, str, int], list[Any]] = {}
        for step, attempt, seq, value, raw in cur.fetchall():
            add_point(level, (run_id, key, step >> SHIFTS[0]), step, attempt, seq, value, raw)
        self._replace(cur, run_id, key, RESOLUTIONS[0], first, level)
        for i in range(1, len(SHIFTS)):
            by = SHIFTS[i] - SHIFTS[i - 1]
            bucket = from_step >> SHIFTS[i]
            cur.execute(
                self.q(
                    f"SELECT bucket, {', '.join(ROLLUP_COLUMNS[4:])} FROM {_T} "
                    "WHERE run_id = ? AND key = ? AND res = ? AND bucket >= ?"
                ),
                (run_id, key, RESOLUTIONS[i - 1], bucket << by),
            )
            finer = {(run_id, key, int(r[0])): list(r[1:]) for r in cur.fetchall()}
            level = coarser(finer, by)
            self._replace(cur, run_id, key, RESOLUTIONS[i], bucket, level)

    def _replace(
        self, cur: Any, run_id: str, key: str, res: int, from_bucket: int, level: dict[Any, list[Any]]
    ) -> None:
        cur.execute(
            self.q(f"DELETE FROM {_T} WHERE run_id = ? AND key = ? AND res = ? AND bucket >= ?"),
            (run_id, key, res, from_bucket),
        )
        if level:
            marks = ", ".join("?" * len(ROLLUP_COLUMNS))
            cur.executemany(
                self.q(f"INSERT INTO {_T} ({', '.join(ROLLUP_COLUMNS)}) VALUES ({marks})"),
                [(r, k, res, b, *a) for (r, k, b), a in level.items()],
            )

    # ------------------------------------------------------------------ reads
    def keys(self, run_id: str) -> list[str]:
        conn = self._conn()
        try:
            return self._keys(conn.cursor(), run_id)
        finally:
            conn.rollback()
            conn.close()

    def series(
        self,
        run_id: str,
        key: str,
        *,
        max_points: int = 1000,
        start: int | None = None,
        end: int | None = None,
        include_superseded: bool = False,
    ) -> Series:
        """At most ``max_points`` buckets of ``key`` over steps [start, end] (either open)."""
        conn = self._conn()
        try:
            cur = conn.cursor()
            if include_superseded:
                return self._series_raw(cur, run_id, key, max_points, start, end, include_superseded=True)
            lo, hi = self._bounds(cur, run_id, key)
            if lo is None or hi is None:
                return Series(1, "raw", start, end)
            s = lo if start is None else max(start, lo)
            e = hi if end is None else min(end, hi)
            if s > e:
                return Series(1, "raw", start, end)
            for i in range(len(SHIFTS) - 1, -1, -1):
                shift, res = SHIFTS[i], RESOLUTIONS[i]
                cur.execute(
                    self.q(
                        f"SELECT count(*) FROM {_T} WHERE run_id = ? AND key = ? AND res = ? AND bucket BETWEEN ? AND ?"
                    ),
                    (run_id, key, res, s >> shift, e >> shift),
                )
                if int(cur.fetchone()[0]) >= max_points:
                    return self._series_rollup(cur, run_id, key, max_points, s, e, i)
            return self._series_raw(cur, run_id, key, max_points, s, e, include_superseded=False)
        finally:
            conn.rollback()
            conn.close()

    def _bounds(self, cur: Any, run_id: str, key: str) -> tuple[int | None, int | None]:
        cur.execute(
            self.q(f"SELECT min(first_step), max(last_step) FROM {_T} WHERE run_id = ? AND key = ? AND res = ?"),
            (run_id, key, RESOLUTIONS[-1]),
        )
        row = cur.fetchone()
        return (row[0], row[1]) if row else (None, None)

    def _series_rollup(self, cur: Any, run_id: str, key: str, max_points: int, s: int, e: int, level: int) -> Series:
        shift, res = SHIFTS[level], RESOLUTIONS[level]
        cur.execute(
            self.q(
                f"SELECT bucket, {', '.join(ROLLUP_COLUMNS[4:])} FROM {_T} "
                "WHERE run_id = ? AND key = ? AND res = ? AND bucket BETWEEN ? AND ? ORDER BY bucket"
            ),
            (run_id, key, res, s >> shift, e >> shift),
        )
        rows = [list(r) for r in cur.fetchall()]
        # the edge buckets, when the range cuts through them: recomputed from the raw points inside
        for idx in {0, len(rows) - 1} if rows else set():
            bucket = rows[idx][0]
            b_lo, b_hi = bucket << shift, ((bucket + 1) << shift) - 1
            if b_lo < s or b_hi > e:
                exact = self._raw_agg(cur, run_id, key, max(b_lo, s), min(b_hi, e))
                rows[idx] = [bucket, *exact] if exact else [bucket]
        aggs = [r[1:] for r in rows if len(r) > 1]
        return _merged(aggs, max_points, Series(res, f"rollup-{res}", s, e))

    def _raw_agg(self, cur: Any, run_id: str, key: str, lo: int, hi: int) -> list[Any] | None:
        cur.execute(
            self.q(
                "SELECT step, attempt, seq, value, raw FROM api_metric_point "
                "WHERE run_id = ? AND key = ? AND step BETWEEN ? AND ? AND superseded = ?"
            ),
            (run_id, key, lo, hi, 0 if self.sqlite else False),
        )
        one: dict[int, list[Any]] = {}
        for step, attempt, seq, value, raw in cur.fetchall():
            add_point(one, 0, step, attempt, seq, value, raw)
        return one.get(0)

    def _series_raw(
        self,
        cur: Any,
        run_id: str,
        key: str,
        max_points: int,
        s: int | None,
        e: int | None,
        *,
        include_superseded: bool,
    ) -> Series:
        sql = "SELECT step, attempt, seq, value, raw FROM api_metric_point WHERE run_id = ? AND key = ?"
        args: list[Any] = [run_id, key]
        if s is not None:
            sql += " AND step >= ?"
            args.append(s)
        if e is not None:
            sql += " AND step <= ?"
            args.append(e)
        if not include_superseded:
            sql += " AND superseded = ?"
            args.append(0 if self.sqlite else False)
        cur.execute(self.q(sql + " ORDER BY step, attempt, seq"), args)
        points = cur.fetchall()
        out = Series(1, "raw", s, e)
        if len(points) <= max_points:
            for step, attempt, seq, value, raw in points:
                out.append([1, 1 if value is None else 0, value, value, step, step, attempt, seq, value, raw])
            return out
        per = math.ceil(len(points) / max_points)
        out.resolution, out.source = 0, "raw-merged"
        group: dict[int, list[Any]] = {}
        for i, (step, attempt, seq, value, raw) in enumerate(points):
            add_point(group, i // per, step, attempt, seq, value, raw)
        for i in sorted(group):
            out.append(group[i])
        return out

    def points_after(
        self, run_id: str, keys: Sequence[str], after_attempt: int, after_seq: int, limit: int = 5000
    ) -> list[tuple[int, int, str, int, float | None, str | None]]:
        """Non-superseded points stored after the cursor (attempt, seq), in that order: the live
        follow. ``(attempt, seq, key, step, value, raw)``."""
        conn = self._conn()
        try:
            cur = conn.cursor()
            sql = (
                "SELECT attempt, seq, key, step, value, raw FROM api_metric_point WHERE run_id = ? "
                "AND (attempt > ? OR (attempt = ? AND seq > ?)) AND superseded = ?"
            )
            args: list[Any] = [run_id, after_attempt, after_attempt, after_seq, 0 if self.sqlite else False]
            if keys:
                sql += f" AND key IN ({', '.join('?' * len(keys))})"
                args += list(keys)
            cur.execute(self.q(sql + " ORDER BY attempt, seq LIMIT ?"), [*args, limit])
            return [tuple(r) for r in cur.fetchall()]  # type: ignore[misc]
        finally:
            conn.rollback()
            conn.close()


def _merged(aggs: list[list[Any]], max_points: int, out: Series) -> Series:
    """Consecutive buckets merged so that at most ``max_points`` remain (min/max kept)."""
    per = max(1, math.ceil(len(aggs) / max_points))
    if per == 1:
        for a in aggs:
            out.append(a)
        return out
    out.resolution *= per
    out.source += f" x{per}"
    for i in range(0, len(aggs), per):
        group: dict[int, list[Any]] = {}
        for a in aggs[i : i + per]:
            merge(group, 0, a)
        out.append(group[0])
    return out
