"""The logs and metrics ingester, and the in-process notifier that wakes log followers.

``BatchConsumer`` is a durable JetStream pull consumer that hands a whole fetched batch of
messages to one handler, so a batch of agent messages becomes one database transaction
(``executemany``), not one per message. Outcomes per message: stored (ack), unreadable or not
what the subject says (term: never redelivered), database failure (nak the whole batch with
backoff; the unique keys make the retry harmless).

The run id of a log or metric batch comes from the subject, never from the payload: a box may
publish only under its own run's subjects, and a payload naming another run is rejected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api as js_api
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from choline_core.bus import Bus, Consumer, ConsumerStats
from choline_core.errors import BusError
from choline_core.events import Envelope, LogBatch, MetricBatch, utcnow
from choline_core.subjects import Subjects

from .metrics import MetricStore
from .store import ApiStore

log = logging.getLogger(__name__)

MAX_TEXT = 64 * 1024  # a log line longer than this is cut (the box's full log goes to S3 at the end)
STREAMS = ("stdout", "stderr", "agent")


class Notifier:
    """Wakes whoever follows a run when new lines or a new state for it were stored.

    A follower takes ``event(run)`` *before* reading the database, then waits on it: a store
    that lands between the read and the wait still wakes it. Replicas do not see each other's
    notifications; followers also poll (once a second) for lines another replica stored.
    """

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def event(self, run_id: str) -> asyncio.Event:
        ev = self._events.get(run_id)
        if ev is None:
            ev = self._events[run_id] = asyncio.Event()
        return ev

    def notify(self, run_id: str) -> None:
        ev = self._events.pop(run_id, None)
        if ev is not None:
            ev.set()

    def wake_all(self) -> None:
        events, self._events = self._events, {}
        for ev in events.values():
            ev.set()


def metrics_key(run_id: str) -> str:
    """The notifier key that wakes a run's live metric followers (``run_id`` wakes log followers)."""
    return f"metrics:{run_id}"


@dataclass
class Parsed:
    msg: Msg
    run_id: str
    batch: Any  # _LogsIn | _MetricsIn


BatchHandler = Callable[[list[tuple[Msg, Any]]], Awaitable[list[Msg]]]


class BatchConsumer:
    """A durable pull consumer whose handler gets every message of a fetch at once.

    The handler returns the messages to terminate (bad data); the others are acked after it
    returns. An exception from the handler naks the whole batch with exponential backoff.
    """

    def __init__(
        self,
        bus: Bus,
        stream: str,
        durable: str,
        filter_subject: str,
        handler: BatchHandler,
        *,
        batch: int = 256,
        ack_wait: float = 60.0,
        max_deliver: int = 50,
        backoff: float = 1.0,
        parse: Callable[[bytes], Any] = Envelope.parse,
    ) -> None:
        self.bus = bus
        self.parse = parse
        self.stream = stream
        self.durable = durable
        self.filter_subject = filter_subject
        self.handler = handler
        self.batch = batch
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.backoff = backoff
        self.stats = ConsumerStats()
        self._stop = asyncio.Event()
        self._waiting = False
        self._sub: Any = None
        self.consumer: Consumer | None = None

    async def start(self) -> Consumer:
        config = js_api.ConsumerConfig(
            durable_name=self.durable,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=self.max_deliver,
            max_ack_pending=max(1000, self.batch * 8),
            deliver_policy=js_api.DeliverPolicy.ALL,
            filter_subject=self.filter_subject,
        )
        try:
            await self.bus.js.add_consumer(self.stream, config=config)
        except nats.js.errors.BadRequestError as exc:
            log.debug("consumer %s/%s exists with another config (%s); keeping it", self.stream, self.durable, exc)
        except nats.js.errors.NotFoundError as exc:
            raise BusError(f"stream {self.stream} does not exist; call ensure_streams() first") from exc
        sub = self._sub = await self.bus.js.pull_subscribe_bind(durable=self.durable, stream=self.stream)
        task = asyncio.create_task(self._loop(sub), name=f"batch-consumer:{self.stream}/{self.durable}")
        self.consumer = Consumer(task, self._stop, self.stats, f"{self.stream}/{self.durable}")
        return self.consumer

    async def stop(self) -> None:
        """Finish the batch in hand; a consumer waiting for messages stops at once."""
        if self.consumer is None:
            return
        self._stop.set()
        if self._waiting:
            self.consumer._task.cancel()
        await self.consumer.stop()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _loop(self, sub: Any) -> None:
        while not self._stop.is_set():
            try:
                self._waiting = True
                try:
                    msgs = await sub.fetch(self.batch, timeout=1.0)
                finally:
                    self._waiting = False
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue
            except (nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError):
                if self._stop.is_set() or self.bus.nc.is_closed:
                    return
                await asyncio.sleep(0.5)
                continue
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                log.debug("fetch on %s/%s: %s", self.stream, self.durable, exc)
                await asyncio.sleep(0.5)
                continue
            await self._handle(msgs)
        with contextlib.suppress(Exception):
            await sub.unsubscribe()

    async def _handle(self, msgs: list[Msg]) -> None:
        readable: list[tuple[Msg, Any]] = []
        for msg in msgs:
            self.stats.handled += 1
            try:
                readable.append((msg, self.parse(msg.data)))
            except ValueError as exc:
                log.error("dropping unreadable message on %s: %s", msg.subject, exc)
                self.stats.rejected += 1
                await _quietly(msg.term())
        if not readable:
            return
        try:
            bad = await self.handler(readable)
        except asyncio.CancelledError:
            for msg, _ in readable:
                await _quietly(msg.nak())
            raise
        except Exception:
            self.stats.errors += len(readable)
            try:
                delivered = readable[0][0].metadata.num_delivered or 1
            except Exception:
                delivered = 1
            delay = min(self.backoff * (2 ** (delivered - 1)), 60.0)
            log.exception(
                "storing a batch of %d from %s failed (delivery %d); retry in %.1fs",
                len(readable),
                self.stream,
                delivered,
                delay,
            )
            for msg, _ in readable:
                await _quietly(msg.nak(delay=delay))
            return
        bad_ids = {id(m) for m in bad}
        for msg, _ in readable:
            if id(msg) in bad_ids:
                self.stats.rejected += 1
                await _quietly(msg.term())
            else:
                self.stats.acked += 1
                await _quietly(msg.ack())


async def _quietly(coro: Awaitable[Any]) -> None:
    try:
        await coro
    except (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError) as exc:
        log.debug("ack/nak failed: %s", exc)


# =============================================================================================
# Message -> rows
# =============================================================================================
def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts


def log_rows(run_id: str, batch: LogBatch | _LogsIn) -> list[dict[str, Any]]:
    rows = []
    for line in batch.lines:
        text = line.text if len(line.text) <= MAX_TEXT else line.text[:MAX_TEXT] + " [cut]"
        rows.append(
            {
                "run_id": run_id,
                "attempt": batch.attempt,
                "seq": line.seq,
                "ts": _utc(line.ts),
                "stream": line.stream if line.stream in STREAMS else "stdout",
                "text": text.replace("\x00", ""),
            }
        )
    return rows


class _Line(BaseModel):
    """Hot-path readers: lenient (extra fields ignored) and validated in pydantic-core alone,
    several times faster than the events' own lenient models on a 1000-point batch."""

    model_config = ConfigDict(extra="ignore")
    seq: int
    ts: datetime = Field(default_factory=utcnow)
    stream: str = "stdout"
    text: str


class _LogsIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    run_id: str
    attempt: int
    lines: list[_Line]


class _Point(BaseModel):
    model_config = ConfigDict(extra="ignore")
    seq: int
    step: int
    key: str
    value: float | None
    raw: str | None = None
    ts: datetime = Field(default_factory=utcnow)
    epoch: int | None = None


class _MetricsIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    run_id: str
    attempt: int
    points: list[_Point]


class MetricsMessage(BaseModel):
    """A whole metrics message, validated straight from its JSON bytes by pydantic-core (the
    points never become Python dicts first): the ingest hot path's reader."""

    model_config = ConfigDict(extra="ignore")
    type: str
    data: _MetricsIn

    @classmethod
    def parse(cls, raw: bytes) -> MetricsMessage:
        return cls.model_validate_json(raw)


class Ingester:
    """Turns LOGS and METRICS batches into rows, one transaction per fetched batch."""

    def __init__(self, store: ApiStore, metrics: MetricStore, subjects: Subjects, notifier: Notifier) -> None:
        self.store = store
        self.metrics = metrics
        self.subjects = subjects
        self.notifier = notifier
        self.lines_offered = 0
        self.points_offered = 0
        self.points_stored = 0

    def _parse(
        self, items: list[tuple[Msg, Envelope]], kind: type[LogBatch] | type[MetricBatch]
    ) -> tuple[list[Parsed], list[Msg]]:
        good: list[Parsed] = []
        bad: list[Msg] = []
        for msg, env in items:
            try:
                run_id = self.subjects.run_id_of(msg.subject)
                if env.type != kind.TYPE:
                    raise ValueError(f"expected a {kind.TYPE!r} event, got {env.type!r}")
                batch: _LogsIn | _MetricsIn = (_LogsIn if kind is LogBatch else _MetricsIn).model_validate(env.data)
            except (ValueError, ValidationError) as exc:
                log.warning("rejecting a %s message on %s: %s", kind.TYPE, msg.subject, str(exc).splitlines()[0])
                bad.append(msg)
                continue
            if batch.run_id != run_id:
                log.warning("rejecting a %s message on %s: it names run %s", kind.TYPE, msg.subject, batch.run_id)
                bad.append(msg)
                continue
            good.append(Parsed(msg, run_id, batch))
        return good, bad

    async def handle_logs(self, items: list[tuple[Msg, Envelope]]) -> list[Msg]:
        good, bad = self._parse(items, LogBatch)
        rows = [r for p in good for r in log_rows(p.run_id, p.batch)]
        if rows:
            self.lines_offered += await asyncio.to_thread(self.store.insert_log_lines, rows)
            for run_id in {p.run_id for p in good}:
                self.notifier.notify(run_id)
        return bad

    async def handle_metrics(self, items: list[tuple[Msg, MetricsMessage]]) -> list[Msg]:
        good: list[Parsed] = []
        bad: list[Msg] = []
        for msg, m in items:
            try:
                run_id = self.subjects.run_id_of(msg.subject)
            except ValueError:
                bad.append(msg)
                continue
            if m.type != MetricBatch.TYPE or m.data.run_id != run_id:
                why = f"a {m.type!r} event" if m.type != MetricBatch.TYPE else f"it names run {m.data.run_id}"
                log.warning("rejecting a %s message on %s: %s", MetricBatch.TYPE, msg.subject, why)
                bad.append(msg)
                continue
            good.append(Parsed(msg, run_id, m.data))
        batches = [(p.run_id, p.batch.attempt, p.batch.points) for p in good]
        if batches:
            result = await asyncio.to_thread(self.metrics.ingest, batches)
            self.points_offered += result.offered
            self.points_stored += result.stored
            for run_id in {p.run_id for p in good}:
                self.notifier.notify(metrics_key(run_id))
        return bad
