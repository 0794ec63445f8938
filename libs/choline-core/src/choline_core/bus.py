"""NATS and JetStream for choline's processes.

- ``Bus.connect()`` with deliberate reconnect behaviour: services and agents retry forever
  (``reconnect="forever"``: one attempt a second, never giving up, since a control plane
  that comes back must find them), the CLI gives up fast (``reconnect="fail-fast"``).
- ``ensure_streams()`` declares every stream of ``Subjects.streams()``; calling it twice,
  or from two processes at once, is harmless.
- ``publish()`` goes through JetStream with ``Nats-Msg-Id`` = the envelope id, so a retried
  publish is stored once.
- ``consume()`` runs a durable pull consumer. Several processes consuming the same durable
  share the work. The handler's outcome decides the ack: return = ack, ``Nack`` = redeliver
  (after ``delay``), ``Reject`` = terminate (never redelivered), any other exception = nack
  with backoff, until ``max_deliver``.
- ``request()``/``serve()`` are core-NATS request/reply in queue groups.
- ``drain()`` lets in-flight handlers finish and flushes before closing; ``wait_for_stop()``
  turns SIGTERM/SIGINT into an event so a service drains instead of dying mid-handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import api as js_api

from .errors import BusError
from .events import Envelope, Event
from .subjects import StreamDef, Subjects

log = logging.getLogger(__name__)

Handler = Callable[[Envelope], Awaitable[None]]
RpcHandler = Callable[[Envelope], Awaitable[Event | Envelope | None]]


class Nack(Exception):
    """Raise from a handler to have the message redelivered after ``delay`` seconds."""

    def __init__(self, reason: str = "", delay: float | None = None) -> None:
        super().__init__(reason)
        self.delay = delay


class Reject(Exception):
    """Raise from a handler to drop the message for good (bad data, not a passing fault)."""


@dataclass
class ConsumerStats:
    handled: int = 0
    acked: int = 0
    nacked: int = 0
    rejected: int = 0
    errors: int = 0


class Consumer:
    """A running durable pull consumer; ``stop()`` finishes the message in hand, then returns."""

    def __init__(self, task: asyncio.Task[None], stop: asyncio.Event, stats: ConsumerStats, name: str) -> None:
        self._task = task
        self._stop = stop
        self.stats = stats
        self.name = name

    async def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    @property
    def running(self) -> bool:
        return not self._task.done()


class Bus:
    def __init__(self, nc: NatsClient, subjects: Subjects) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = subjects
        self._consumers: list[Consumer] = []
        self._subs: list[Any] = []

    # ------------------------------------------------------------------ connection
    @classmethod
    async def connect(
        cls,
        url: str | list[str],
        *,
        name: str,
        subjects: Subjects | None = None,
        reconnect: str = "forever",
        creds: str | None = None,
        token: str | None = None,
        inbox_prefix: str | None = None,
        connect_timeout: float = 2.0,
    ) -> Bus:
        """Connect. ``reconnect``: ``forever`` (services, agents) or ``fail-fast`` (CLI, tests)."""
        servers = [url] if isinstance(url, str) else url
        opts: dict[str, Any] = {
            "servers": servers,
            "name": name,
            "connect_timeout": connect_timeout,
            "allow_reconnect": True,
            "error_cb": _log_error,
            "disconnected_cb": _log_disconnect(name),
            "reconnected_cb": _log_reconnect(name),
        }
        if reconnect == "forever":
            opts.update(max_reconnect_attempts=-1, reconnect_time_wait=1, ping_interval=10, max_outstanding_pings=3)
        elif reconnect == "fail-fast":
            opts.update(max_reconnect_attempts=2, reconnect_time_wait=0.5)
        else:
            raise ValueError(f"reconnect must be 'forever' or 'fail-fast', not {reconnect!r}")
        if creds:
            opts["user_credentials"] = creds
        if token:
            opts["token"] = token
        if inbox_prefix:
            opts["inbox_prefix"] = inbox_prefix
        try:
            nc = await nats.connect(**opts)
        except (OSError, nats.errors.Error, asyncio.TimeoutError) as exc:
            raise BusError(
                f"cannot reach NATS at {', '.join(servers)}: {exc or type(exc).__name__}",
                hint="is the control plane up? run 'choline up' or 'choline status'",
            ) from exc
        return cls(nc, subjects or Subjects())

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    async def drain(self) -> None:
        """Stop consumers (finishing messages in hand), then drain and close the connection."""
        for consumer in list(self._consumers):
            await consumer.stop()
        self._consumers.clear()
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except (nats.errors.Error, asyncio.TimeoutError) as exc:
                log.warning("drain failed (%s); closing", exc)
                await self.nc.close()

    async def close(self) -> None:
        for consumer in list(self._consumers):
            await consumer.stop()
        self._consumers.clear()
        if not self.nc.is_closed:
            await self.nc.close()

    # ------------------------------------------------------------------ streams
    async def ensure_streams(self, streams: list[StreamDef] | None = None) -> None:
        """Create or update every stream (idempotent)."""
        for sd in streams or self.subjects.streams():
            config = js_api.StreamConfig(
                name=sd.name,
                subjects=list(sd.subjects),
                description=sd.description or None,
                storage=js_api.StorageType.FILE,
                retention=js_api.RetentionPolicy.LIMITS,
                max_age=sd.max_age_s or None,
                max_msgs_per_subject=sd.max_msgs_per_subject,
                duplicate_window=sd.duplicate_window_s,
                discard=js_api.DiscardPolicy.OLD,
            )
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if getattr(exc, "err_code", None) == 10058:  # stream name already in use
                    await self.js.update_stream(config)
                else:
                    raise BusError(f"cannot declare stream {sd.name}: {exc}") from exc

    async def delete_streams(self) -> None:
        """Delete this prefix's streams (tests and ``choline down --purge``)."""
        for sd in self.subjects.streams():
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await self.js.delete_stream(sd.name)

    # ------------------------------------------------------------------ publish
    async def publish(
        self,
        subject: str,
        event: Event | Envelope,
        *,
        timeout: float = 5.0,
        retries: int = 3,
    ) -> js_api.PubAck:
        """Publish to JetStream; the envelope id is the dedup id, so retrying is safe."""
        env = event if isinstance(event, Envelope) else event.envelope()
        payload = env.to_bytes()
        headers = {"Nats-Msg-Id": env.id}
        delay = 0.2
        for attempt in range(retries + 1):
            try:
                return await self.js.publish(subject, payload, timeout=timeout, headers=headers)
            except (
                nats.errors.TimeoutError,
                nats.js.errors.NoStreamResponseError,
                nats.errors.ConnectionClosedError,
                nats.errors.OutboundBufferLimitError,
            ) as exc:
                if attempt == retries:
                    raise BusError(
                        f"publish to {subject} failed after {retries + 1} tries: {type(exc).__name__}"
                    ) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    async def publish_core(self, subject: str, event: Event | Envelope) -> None:
        """Fire-and-forget on core NATS (no stream, no ack): for ephemeral signals only."""
        env = event if isinstance(event, Envelope) else event.envelope()
        await self.nc.publish(subject, env.to_bytes())

    # ------------------------------------------------------------------ consume
    async def consume(
        self,
        durable: str,
        filter_subject: str | list[str],
        handler: Handler,
        *,
        stream: str | None = None,
        batch: int = 16,
        ack_wait: float = 30.0,
        max_deliver: int = 20,
        backoff: float = 1.0,
        deliver_new: bool = False,
        max_ack_pending: int = 1000,
    ) -> Consumer:
        """Start a durable pull consumer that feeds ``handler`` until stopped."""
        filters = [filter_subject] if isinstance(filter_subject, str) else list(filter_subject)
        stream = stream or self.subjects.stream_for(filters[0].replace("*", "x").replace(">", "x"))
        config = js_api.ConsumerConfig(
            durable_name=durable,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_deliver=max_deliver,
            max_ack_pending=max_ack_pending,
            deliver_policy=js_api.DeliverPolicy.NEW if deliver_new else js_api.DeliverPolicy.ALL,
        )
        if len(filters) == 1:
            config.filter_subject = filters[0]
        else:
            config.filter_subjects = filters
        await self._ensure_consumer(stream, durable, config)
        sub = await self.js.pull_subscribe_bind(durable=durable, stream=stream)
        stop = asyncio.Event()
        stats = ConsumerStats()
        name = f"{stream}/{durable}"

        async def loop() -> None:
            while not stop.is_set():
                try:
                    msgs = await sub.fetch(batch, timeout=1.0)
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    # nats-py raises a bare asyncio.TimeoutError when a fetch overruns under load
                    continue
                except (nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError):
                    if stop.is_set() or self.nc.is_closed:
                        return
                    await asyncio.sleep(0.5)
                    continue
                except (nats.errors.Error, nats.js.errors.Error) as exc:
                    log.debug("fetch on %s: %s", name, exc)
                    await asyncio.sleep(0.5)
                    continue
                for msg in msgs:
                    await self._handle(msg, handler, stats, name, backoff)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

        task = asyncio.create_task(loop(), name=f"consumer:{name}")
        consumer = Consumer(task, stop, stats, name)
        self._consumers.append(consumer)
        return consumer

    async def _ensure_consumer(self, stream: str, durable: str, config: js_api.ConsumerConfig) -> None:
        try:
            await self.js.add_consumer(stream, config=config)
        except nats.js.errors.BadRequestError as exc:
            # An existing durable with a different config: update what can be updated.
            log.debug("consumer %s/%s exists with other config (%s); keeping it", stream, durable, exc)
        except nats.js.errors.NotFoundError as exc:
            raise BusError(f"stream {stream} does not exist; call ensure_streams() first") from exc

    async def _handle(self, msg: Msg, handler: Handler, stats: ConsumerStats, name: str, backoff: float) -> None:
        stats.handled += 1
        try:
            env = Envelope.parse(msg.data)
        except ValueError as exc:
            log.error("dropping unreadable message on %s: %s", msg.subject, exc)
            stats.rejected += 1
            await _safe(msg.term())
            return
        extra = {"subject": msg.subject, "msg_id": env.id, "run_id": env.run_id}
        try:
            await handler(env)
        except Nack as exc:
            stats.nacked += 1
            log.info("nack %s (%s)", env.type, exc, extra=extra)
            await _safe(msg.nak(delay=exc.delay))
        except Reject as exc:
            stats.rejected += 1
            log.warning("rejected %s: %s", env.type, exc, extra=extra)
            await _safe(msg.term())
        except asyncio.CancelledError:
            await _safe(msg.nak())
            raise
        except Exception:
            stats.errors += 1
            try:
                delivered = msg.metadata.num_delivered or 1
            except Exception:
                delivered = 1
            delay = min(backoff * (2 ** (delivered - 1)), 60.0)
            log.exception(
                "handler for %s failed (delivery %d); retry in %.1fs", env.type, delivered, delay, extra=extra
            )
            await _safe(msg.nak(delay=delay))
        else:
            stats.acked += 1
            await _safe(msg.ack())

    # ------------------------------------------------------------------ request/reply
    async def request(self, subject: str, event: Event | Envelope, *, timeout: float = 5.0) -> Envelope:
        env = event if isinstance(event, Envelope) else event.envelope()
        try:
            reply = await self.nc.request(subject, env.to_bytes(), timeout=timeout)
        except nats.errors.NoRespondersError as exc:
            raise BusError(f"no service answers {subject}", hint="is the control plane up? 'choline status'") from exc
        except nats.errors.TimeoutError as exc:
            raise BusError(f"no answer on {subject} within {timeout:g}s") from exc
        return Envelope.parse(reply.data)

    async def serve(self, subject: str, handler: RpcHandler, *, queue: str | None = None) -> None:
        """Answer requests on ``subject`` in queue group ``queue`` (one replica answers each)."""

        async def on_msg(msg: Msg) -> None:
            try:
                env = Envelope.parse(msg.data)
                result = await handler(env)
                out = result if isinstance(result, Envelope) or result is None else result.envelope()
                body = out.to_bytes() if out is not None else Envelope(type="ok").to_bytes()
            except Exception as exc:
                from .errors import CholineError

                err = exc if isinstance(exc, CholineError) else None
                if err is None:
                    log.exception("rpc handler for %s failed", subject)
                body = Envelope(
                    type="error",
                    data=err.to_body() if err else {"type": "bug", "message": f"{type(exc).__name__}: {exc}"},
                ).to_bytes()
            if msg.reply:
                await msg.respond(body)

        sub = await self.nc.subscribe(subject, queue=queue or "", cb=on_msg)
        self._subs.append(sub)

    async def subscribe_core(self, subject: str, handler: Handler) -> Any:
        """A plain core-NATS subscription (ephemeral; for live tails)."""

        async def on_msg(msg: Msg) -> None:
            try:
                await handler(Envelope.parse(msg.data))
            except Exception:
                log.exception("subscriber on %s failed", subject)

        sub = await self.nc.subscribe(subject, cb=on_msg)
        self._subs.append(sub)
        return sub


async def _safe(coro: Awaitable[Any]) -> None:
    try:
        await coro
    except (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError) as exc:
        log.debug("ack/nak failed: %s", exc)


async def _log_error(exc: Exception) -> None:
    log.debug("nats: %s", exc)


def _log_disconnect(name: str) -> Callable[[], Awaitable[None]]:
    async def cb() -> None:
        log.warning("%s: disconnected from NATS", name)

    return cb


def _log_reconnect(name: str) -> Callable[[], Awaitable[None]]:
    async def cb() -> None:
        log.info("%s: reconnected to NATS", name)

    return cb


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stop`` (a service then drains and exits)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
