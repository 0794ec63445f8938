"""The monitor service process: ``python -m choline_monitor``.

Durable consumers (several replicas share them):

- ``monitor-metrics``     ``<p>.runs.*.metrics``   metric batches
- ``monitor-heartbeats``  ``<p>.boxes.*.heartbeat`` box heartbeats
- ``monitor-runs``        ``<p>.runs.*.events``    attempt started/ended, run state changes

Findings go to ``<p>.monitor.findings`` as ``FindingRaised`` events. Requests (core NATS, queue
group ``monitor``):

- ``<p>.rpc.monitor.configure`` ``{"run_id", "overrides": {...}}`` or ``{"run_id", "set": ["k=v"]}``
  (``"merge": true``: into the run's overrides rather than replacing them)
  -> ``monitor.config`` ``{"run_id", "overrides", "config"}``
- ``<p>.rpc.monitor.findings`` ``{"run_id"?, "limit"?}`` -> ``monitor.findings`` ``{"findings": [...]}``
  (each with ``advice``: a summary of the advisor's answer, when there is one)
- ``<p>.rpc.monitor.advise`` / ``.advice`` / ``.policy``: the advisor and the run's policy
  (issue 15; contracts in ``choline_core.advice``, see ``advisor.py`` and ``actions.py``)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

from choline_core import advice as advice_api
from choline_core.errors import BadSpec, StorageError
from choline_core.events import Envelope
from choline_core.settings import CholineSettings
from choline_core.storage import S3Store
from choline_svc.db import database_url, make_engine, migrate
from choline_svc.service import Service

from .actions import Actions
from .advice_store import AdviceStore
from .advisor import Advisor, AdvisorSettings
from .config import MonitorConfig, _deep_merge, parse_overrides
from .handlers import Monitor
from .models import FindingPublic
from .sources import Sources
from .store import MonitorStore

log = logging.getLogger(__name__)

DURABLE_METRICS = "monitor-metrics"
DURABLE_HEARTBEATS = "monitor-heartbeats"
DURABLE_RUNS = "monitor-runs"


class MonitorSettings(AdvisorSettings):
    """``CHOLINE_MONITOR_CONFIG``: a JSON file of installation-wide overrides of the detector defaults."""

    monitor_config: Path | None = None
    monitor_sweep_s: float = 5.0

    def detector_defaults(self) -> MonitorConfig:
        if not self.monitor_config:
            return MonitorConfig()
        try:
            overrides = json.loads(Path(self.monitor_config).read_text())
        except (OSError, ValueError) as exc:
            raise BadSpec(
                f"cannot read the monitor config {self.monitor_config}: {exc}",
                hint='CHOLINE_MONITOR_CONFIG must name a JSON file such as {"divergence": {"k": 6}}',
            ) from exc
        return MonitorConfig().with_overrides(overrides)


class MonitorService(Service):
    name = "monitor"
    settings_cls = MonitorSettings
    settings: MonitorSettings

    def __init__(self, settings: CholineSettings | None = None) -> None:
        if settings is not None and not isinstance(settings, MonitorSettings):
            settings = MonitorSettings(**settings.model_dump())
        super().__init__(settings)
        self.engine: Engine | None = None
        self.monitor: Monitor | None = None
        self.advisor: Advisor | None = None
        self.actions: Actions | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        assert self.bus is not None
        defaults = self.settings.detector_defaults()
        self.engine = make_engine(database_url(self.settings, "monitor"), "monitor")
        await asyncio.to_thread(migrate, self.engine, "choline_monitor.migrations")
        self.monitor = Monitor(MonitorStore(self.engine), self.bus, defaults)
        self._start_advisor(self.monitor)
        m, s = self.monitor, self.subjects
        await self.bus.consume(DURABLE_METRICS, s.all_run_metrics(), self.timed("metrics", m.handle_metrics))
        await self.bus.consume(DURABLE_HEARTBEATS, s.all_box_heartbeats(), self.timed("heartbeat", m.handle_heartbeat))
        await self.bus.consume(DURABLE_RUNS, s.all_run_events(), self.timed("run_event", m.handle_run_event))
        await self.bus.serve(s.rpc("monitor", "configure"), self._rpc_configure, queue="monitor")
        await self.bus.serve(s.rpc("monitor", "findings"), self._rpc_findings, queue="monitor")
        for method, handler in (
            (advice_api.ADVISE, self._rpc_advise),
            (advice_api.ADVICE, self._rpc_advice),
            (advice_api.POLICY, self._rpc_policy),
        ):
            await self.bus.serve(s.rpc("monitor", method), self.timed(method, handler), queue="monitor")
        await self.bus.nc.flush()  # the server knows the subscriptions before anyone is told we are ready
        await m.publish_pending()
        self._sweeper = asyncio.create_task(self._sweep(), name="monitor-outbox")

    async def stop(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self.advisor is not None:
            await self.advisor.stop()
        if self.engine is not None:
            self.engine.dispose()

    def checks(self) -> dict[str, bool]:
        checks = super().checks()
        ok = False
        if self.engine is not None:
            try:
                with self.engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                ok = True
            except Exception:
                ok = False
        checks["database"] = ok
        return checks

    async def _sweep(self) -> None:
        assert self.monitor is not None
        while True:
            await asyncio.sleep(self.settings.monitor_sweep_s)
            try:
                await self.monitor.publish_pending()
            except Exception:
                log.exception("outbox sweep failed")
            if self.advisor is not None:
                try:
                    await self.advisor.resume_pending()
                except Exception:
                    log.exception("advisor sweep failed")

    async def _rpc_configure(self, env: Envelope) -> Envelope:
        assert self.monitor is not None
        data = env.data
        run_id = data.get("run_id")
        if not isinstance(run_id, str) or not run_id:
            raise BadSpec("configure needs a run_id")
        overrides: dict[str, Any] | None = data.get("overrides")
        if data.get("set"):
            overrides = parse_overrides([str(x) for x in data["set"]])
        if overrides is not None and not isinstance(overrides, dict):
            raise BadSpec('overrides must be an object such as {"divergence": {"k": 6}}')
        if data.get("merge") and overrides:  # into the run's overrides instead of replacing them
            stored = await asyncio.to_thread(self.monitor.store.load_run, run_id)
            overrides = _deep_merge((stored.overrides or {}) if stored else {}, overrides)
        config = await self.monitor.configure(run_id, overrides)
        return Envelope(
            type="monitor.config",
            run_id=run_id,
            data={"run_id": run_id, "overrides": overrides or {}, "config": config.model_dump(mode="json")},
        )

    async def _rpc_findings(self, env: Envelope) -> Envelope:
        assert self.monitor is not None
        run_id = env.data.get("run_id")
        limit = int(env.data.get("limit", 100))
        found = await self.monitor.findings(run_id, limit=max(1, min(limit, 1000)))
        out = [f.model_dump(mode="json") for f in found]
        if self.advisor is not None and out:
            advice = await asyncio.to_thread(self.advisor.store.for_findings, [f["id"] for f in out])
            for f in out:
                row = advice.get(f["id"])
                if row is not None:
                    f["advice"] = _advice_summary(row.public())
        return Envelope(type="monitor.findings", data={"findings": out})

    # ------------------------------------------------------------------ the advisor and the policy
    def _start_advisor(self, monitor: Monitor) -> None:
        assert self.engine is not None
        s = self.settings
        store = AdviceStore(self.engine)
        self.actions = Actions(
            store,
            self.bus,
            default_policy=s.monitor_policy,
            pause_on=s.monitor_pause_on,
            pause_max_age_s=s.monitor_pause_max_age_s,
        )
        try:
            objects = S3Store.from_settings(s)
        except StorageError:
            objects = None  # the context then goes without the script, the environment spec and datasets
        findings_store = monitor.store

        def findings(run_id: str) -> list[FindingPublic]:
            return [r.public() for r in findings_store.findings(run_id, limit=1000)]

        self.advisor = Advisor(store, Sources(self.bus, objects), s.chat_model(), s, findings)
        monitor.after_publish += [self.actions.on_finding, self.advisor.on_finding]
        if s.llm_configured():
            log.info("advisor: model %s at %s", s.llm_model, s.llm_base_url or "the OpenAI API")
        else:
            log.info("advisor: no language model configured; findings keep the detectors' own messages")

    async def _rpc_advise(self, env: Envelope) -> Envelope:
        assert self.advisor is not None
        req = _event(env, advice_api.AdviseRequest)
        info = await self.advisor.ask(req.run_id, req.question, req.finding_id, req.by)
        return advice_api.AdviceList(advice=[info]).envelope(run_id=req.run_id)

    async def _rpc_advice(self, env: Envelope) -> Envelope:
        assert self.advisor is not None
        q = _event(env, advice_api.AdviceQuery)
        found = await self.advisor.advice_of(
            q.run_id, limit=max(1, min(q.limit, 200)), advice_id=q.advice_id, include_context=q.include_context
        )
        return advice_api.AdviceList(advice=found).envelope(run_id=q.run_id)

    async def _rpc_policy(self, env: Envelope) -> Envelope:
        assert self.actions is not None and self.monitor is not None
        req = _event(env, advice_api.PolicyRequest)
        if req.policy is not None:
            await asyncio.to_thread(self.actions.store.set_policy, req.run_id, req.policy)
            log.info("policy of %s set to %s", req.run_id, req.policy, extra={"run_id": req.run_id})
        policy, explicit = await self.actions.policy(req.run_id)
        stored = await asyncio.to_thread(self.monitor.store.load_run, req.run_id)
        return advice_api.PolicyInfo(
            run_id=req.run_id,
            policy=policy,
            explicit=explicit,
            pause_on=self.actions.pause_on,
            overrides=(stored.overrides or {}) if stored else {},
        ).envelope(run_id=req.run_id)


def _event(env: Envelope, cls: Any) -> Any:
    try:
        return env.event(cls)
    except ValueError as exc:
        raise BadSpec(f"not a valid {cls.TYPE} request: {str(exc)[:300]}") from None


def _advice_summary(info: advice_api.AdviceInfo) -> dict[str, Any]:
    """What a finding carries of its advice (the whole of it: ``advice`` requests)."""
    a = info.answer
    return {
        "id": info.id,
        "status": info.status,
        "source": info.source,
        "diagnosis": (a.diagnosis[:400] if a else None),
        "recommended_action": a.recommended_action if a else None,
        "confidence": a.confidence if a else None,
        "has_fix": bool(a and not a.fix.empty),
        "error": info.error,
    }
