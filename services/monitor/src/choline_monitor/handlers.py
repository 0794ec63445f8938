"""The monitor's message handlers: events in, watch state and findings out.

Each handled message runs under the run's lock (one message per run at a time in a process):
load the run's watch (cached; from ``monitor_run`` otherwise), feed it the event, then
``MonitorStore.commit()`` the new state and findings in one guarded transaction, and only then
publish the findings (``Nats-Msg-Id`` = finding id) and mark them published. The consumer acks
after the handler returns.

What a crash at each point leaves:
- before the commit: nothing stored; the message is redelivered and handled from the stored
  state, so it produces the same findings with the same ids;
- after the commit, before the publish: the message is redelivered but its points are below the
  stored high-water mark (nothing new), and the outbox sweep publishes the stored findings;
- after the publish, before marking it: the sweep publishes again with the same message id,
  which JetStream drops inside its duplicate window and readers drop by ``finding_id``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from choline_core.bus import Bus, Nack, Reject
from choline_core.errors import BusError
from choline_core.events import (
    AttemptEnded,
    AttemptStarted,
    Envelope,
    Heartbeat,
    MetricBatch,
    RunStateChanged,
)

from .config import MonitorConfig
from .models import FindingPublic
from .store import MonitorStore, StaleState, row_to_finding
from .watch import Finding, RunWatch

log = logging.getLogger(__name__)

RUN_EVENT_TYPES = (AttemptEnded.TYPE, AttemptStarted.TYPE, RunStateChanged.TYPE)


class Monitor:
    """Handlers for metric batches, heartbeats and run events; publishing findings."""

    def __init__(
        self,
        store: MonitorStore,
        bus: Bus | None,
        defaults: MonitorConfig | None = None,
        *,
        cache_size: int = 2000,
    ) -> None:
        self.store = store
        self.bus = bus
        self.defaults = defaults or MonitorConfig()
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[RunWatch, int]] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self.published = 0
        # called for each finding once it is in JetStream, before it is marked published; a
        # BusError leaves it unpublished so the outbox sweep calls them again (they are idempotent)
        self.after_publish: list[Callable[[Finding], Awaitable[object]]] = []

    # ------------------------------------------------------------------ handlers
    async def handle_metrics(self, env: Envelope) -> None:
        batch = _parse(env, MetricBatch)
        await self._apply(batch.run_id, lambda w: w.feed_batch(batch))

    async def handle_heartbeat(self, env: Envelope) -> None:
        hb = _parse(env, Heartbeat)
        if not hb.run_id:
            return  # an idle box
        await self._apply(hb.run_id, lambda w: w.feed_heartbeat(hb, env.ts))

    async def handle_run_event(self, env: Envelope) -> None:
        if env.type not in RUN_EVENT_TYPES:
            return
        if env.type == AttemptEnded.TYPE:
            ended = _parse(env, AttemptEnded)
            await self._apply(ended.run_id, lambda w: w.feed_end(ended, env.ts))
        elif env.type == AttemptStarted.TYPE:
            started = _parse(env, AttemptStarted)
            await self._apply(started.run_id, lambda w: w.feed_attempt_started(started, env.ts))
        else:
            changed = _parse(env, RunStateChanged)
            await self._apply(changed.run_id, lambda w: w.feed_state(changed, env.ts))

    # ------------------------------------------------------------------ core
    def _lock(self, run_id: str) -> asyncio.Lock:
        lock = self._locks.get(run_id)
        if lock is None:
            lock = self._locks[run_id] = asyncio.Lock()
        return lock

    async def load_watch(self, run_id: str) -> tuple[RunWatch, int | None]:
        entry = self._cache.get(run_id)
        if entry is not None:
            self._cache.move_to_end(run_id)
            return entry
        stored = await asyncio.to_thread(self.store.load_run, run_id)
        if stored is None:
            return RunWatch(run_id, self.defaults), None
        try:
            config = self.defaults.with_overrides(stored.overrides)
        except Exception:
            log.exception("stored monitor overrides for %s no longer validate; using the defaults", run_id)
            config = self.defaults
        return RunWatch(run_id, config, stored.state), stored.version

    async def _apply(self, run_id: str, feed: Callable[[RunWatch], list[Finding]]) -> list[Finding]:
        async with self._lock(run_id):
            watch, version = await self.load_watch(run_id)
            watch.changed = False
            try:
                findings = feed(watch)
                if not watch.changed and not findings:
                    self._remember(run_id, watch, version)
                    return []
                new_version = await asyncio.to_thread(
                    self.store.commit, run_id, version, watch.state(), watch.closed, findings
                )
            except StaleState as exc:
                self._cache.pop(run_id, None)
                raise Nack(f"run {run_id} moved on elsewhere; reloading", delay=0.05) from exc
            except BaseException:
                self._cache.pop(run_id, None)  # the watch may be half-fed: reload from the store next time
                raise
            if watch.closed:
                self._cache.pop(run_id, None)
                self._locks.pop(run_id, None)
            else:
                self._remember(run_id, watch, new_version)
        for f in findings:
            log.info("finding %s on %s: %s", f.detector, run_id, f.message, extra={"run_id": run_id})
        await self.publish(findings)
        return findings

    def _remember(self, run_id: str, watch: RunWatch, version: int | None) -> None:
        if version is None:
            return  # nothing stored yet: nothing to cache against
        self._cache[run_id] = (watch, version)
        self._cache.move_to_end(run_id)
        while len(self._cache) > self.cache_size:
            old, _ = self._cache.popitem(last=False)
            lock = self._locks.get(old)
            if lock is not None and not lock.locked():
                self._locks.pop(old, None)

    # ------------------------------------------------------------------ publishing
    async def publish(self, findings: list[Finding]) -> int:
        """Publish findings on the findings subject and mark them published; failures wait for the sweep."""
        if not findings or self.bus is None:
            return 0
        done: list[str] = []
        subject = self.bus.subjects.monitor_findings()
        for f in findings:
            try:
                await self.bus.publish(subject, f.envelope())
                for hook in self.after_publish:  # the actions (auto-pause) and the advisor (issue 15)
                    await hook(f)
            except BusError as exc:
                log.warning("could not publish finding %s or act on it (%s); the outbox sweep will retry", f.id, exc)
                break
            except Exception:
                log.exception("acting on finding %s failed; it stays published", f.id)
            done.append(f.id)
        if done:
            await asyncio.to_thread(self.store.mark_published, done)
            self.published += len(done)
        return len(done)

    async def publish_pending(self) -> int:
        """Publish what is stored but not yet published (after a crash, or a NATS outage)."""
        rows = await asyncio.to_thread(self.store.unpublished)
        return await self.publish([row_to_finding(r) for r in rows])

    # ------------------------------------------------------------------ requests
    async def configure(self, run_id: str, overrides: dict[str, Any] | None) -> MonitorConfig:
        """Set a run's overrides (validated first: a bad one raises ``BadSpec`` and changes nothing)."""
        config = self.defaults.with_overrides(overrides)
        async with self._lock(run_id):
            await asyncio.to_thread(self.store.set_overrides, run_id, overrides)
            self._cache.pop(run_id, None)
        return config

    async def config_for(self, run_id: str) -> MonitorConfig:
        stored = await asyncio.to_thread(self.store.load_run, run_id)
        return self.defaults.with_overrides(stored.overrides if stored else None)

    async def findings(self, run_id: str | None = None, *, limit: int = 100) -> list[FindingPublic]:
        rows = await asyncio.to_thread(self.store.findings, run_id, limit=limit)
        return [r.public() for r in rows]


def _parse(env: Envelope, cls: Any) -> Any:
    try:
        return env.event(cls)
    except (ValidationError, ValueError) as exc:
        raise Reject(f"not a valid {cls.TYPE}: {exc}") from exc
