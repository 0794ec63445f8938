"""The provisioner service process: consumers, RPC answers and background loops around ``RunDriver``."""

from __future__ import annotations

import asyncio
import logging
import signal
from urllib.parse import urlparse

from choline_core.bus import Reject
from choline_core.errors import NotFound
from choline_core.events import (
    AttemptEnded,
    AttemptStarted,
    ControlAction,
    ControlCommand,
    Envelope,
    Heartbeat,
    RunRequested,
    RunSpec,
    RunState,
)
from choline_core.rpc import (
    AttemptInfo,
    BoxList,
    BoxQuery,
    OfferList,
    OffersQuery,
    RunInfo,
    RunList,
    RunQuery,
)
from choline_core.specs import parse_gpu_spec
from choline_svc.db import database_url, make_engine, migrate
from choline_svc.service import Service

from .lifecycle import RunDriver, periodic
from .models import Run, now, utc
from .providers.offers import OfferFilters
from .settings import ProvisionerSettings
from .store import Store, box_cost

log = logging.getLogger(__name__)


class ProvisionerService(Service):
    name = "provisioner"
    settings_cls = ProvisionerSettings
    settings: ProvisionerSettings

    def __init__(self, settings: ProvisionerSettings | None = None) -> None:
        super().__init__(settings)
        self.driver: RunDriver | None = None
        self.store: Store | None = None
        self._loops: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        assert self.bus is not None
        s = self.settings
        engine = make_engine(database_url(s, self.name), self.name)
        await asyncio.to_thread(migrate, engine, "choline_provisioner.migrations")
        self.store = Store(engine)
        nats_port = urlparse(s.nats_url).port or 4222
        s3_port = urlparse(s.s3_endpoint).port or 80
        self.driver = RunDriver(s, self.store, self.bus, self.subjects, nats_port=nats_port, s3_port=s3_port)
        subj = self.subjects
        await self.consume("provisioner-requests", subj.provision("requests"), self.on_run_requested)
        await self.consume("provisioner-run-events", subj.all_run_events(), self.on_run_event)
        await self.consume("provisioner-control", subj.all_run_control(), self.on_control)
        await self.consume("provisioner-heartbeats", subj.all_box_heartbeats(), self.on_heartbeat, batch=64)
        for method, handler in (
            ("get_run", self.rpc_get_run),
            ("list_runs", self.rpc_list_runs),
            ("offers", self.rpc_offers),
            ("boxes", self.rpc_boxes),
        ):
            await self.bus.serve(subj.rpc(self.name, method), handler, queue=self.name)
        for run in self.store.active_runs():
            self.driver.ensure_driver(run.id)
        loop = asyncio.get_running_loop()
        driver = self.driver
        loop.add_signal_handler(signal.SIGUSR1, lambda: asyncio.ensure_future(driver.drop_tunnels()))
        self._loops.append(asyncio.create_task(periodic(s.reaper_interval_s, self.driver.reap, "reaper")))
        self._loops.append(asyncio.create_task(periodic(s.lease_s / 2, self._adopt_orphans, "adopter")))

    async def stop(self) -> None:
        for task in self._loops:
            task.cancel()
        if self.driver is not None:
            await self.driver.stop()

    def checks(self) -> dict[str, bool]:
        return {**super().checks(), "database": self.store is not None}

    async def _adopt_orphans(self) -> None:
        """Drive active runs whose lease lapsed (another replica died)."""
        assert self.store is not None and self.driver is not None
        for run in self.store.active_runs():
            idle = run.id not in self.driver.tasks or self.driver.tasks[run.id].done()
            free = run.lease_until is None or run.lease_until < now() or run.lease_owner == self.driver.me
            if idle and free:
                self.driver.ensure_driver(run.id)

    # ------------------------------------------------------------------ consumers
    async def on_run_requested(self, env: Envelope) -> None:
        assert self.store is not None and self.driver is not None
        req = env.event(RunRequested)
        try:
            parse_gpu_spec(req.spec.gpus)
        except Exception as exc:
            raise Reject(f"bad GPU spec in run {req.run_id}: {exc}") from exc
        scheduled = req.spec.start_at is not None and utc(req.spec.start_at) > now()  # type: ignore[operator]
        state = RunState.scheduled if scheduled else RunState.queued
        if self.store.insert_run(req.run_id, req.owner, req.spec, state):
            log.info(
                "run %s requested by %s: %s on %s %s",
                req.run_id,
                req.owner,
                req.spec.script,
                req.spec.provider,
                req.spec.gpus,
                extra={"run_id": req.run_id, "msg_id": env.id},
            )
            run = self.store.run(req.run_id)
            assert run is not None
            await self.driver.publish_state(run, None, "scheduled" if scheduled else None)
        self.driver.ensure_driver(req.run_id)

    async def on_run_event(self, env: Envelope) -> None:
        assert self.store is not None and self.driver is not None
        if env.type == AttemptStarted.TYPE:  # from the agent, once it knows the step it resumed from
            started = env.event(AttemptStarted)
            self.store.update_attempt(started.run_id, started.attempt, resumed_from_step=started.resumed_from_step)
            return
        if env.type != AttemptEnded.TYPE:
            return
        ended = env.event(AttemptEnded)
        if self.store.end_attempt(
            ended.run_id,
            ended.attempt,
            end_reason=ended.reason,
            exit_code=ended.exit_code,
            last_step=ended.last_step,
            traceback_tail=ended.traceback_tail,
        ):
            log.info(
                "run %s attempt %d ended: %s", ended.run_id, ended.attempt, ended.reason, extra={"run_id": ended.run_id}
            )
        self.driver.ensure_driver(ended.run_id)
        self.driver.wake(ended.run_id)

    async def on_control(self, env: Envelope) -> None:
        assert self.store is not None and self.driver is not None
        cmd = env.event(ControlCommand)
        run = self.store.run(cmd.run_id)
        if run is None or RunState(run.state).terminal:
            return
        state = RunState(run.state)
        if cmd.action is ControlAction.cancel or (
            cmd.action is ControlAction.stop
            and state
            in (RunState.queued, RunState.scheduled, RunState.provisioning, RunState.paused, RunState.recovering)
        ):
            self.store.update_run(run, pending_action="cancel")
        elif cmd.action is ControlAction.pause and state in (RunState.syncing, RunState.running):
            await self.driver.set_state(run, RunState.pausing, "pause requested", pending_action="pause")
        elif cmd.action is ControlAction.pause and state in (RunState.queued, RunState.recovering, RunState.scheduled):
            await self.driver.set_state(run, RunState.paused, "paused before a box was rented")
        elif cmd.action is ControlAction.resume and state is RunState.paused:
            await self.driver.set_state(run, RunState.queued, "resumed")
        elif cmd.action is ControlAction.stop and state in (RunState.syncing, RunState.running, RunState.pausing):
            await self.driver.set_state(run, RunState.finishing, "stop requested", pending_action="stop")
        self.driver.ensure_driver(run.id)
        self.driver.wake(run.id)

    async def on_heartbeat(self, env: Envelope) -> None:
        assert self.driver is not None
        hb = env.event(Heartbeat)
        self.driver.on_heartbeat(hb.box_id, hb.phase)

    # ------------------------------------------------------------------ RPC
    def run_info(self, run: Run) -> RunInfo:
        assert self.store is not None
        spec = RunSpec.model_validate_json(run.spec_json)
        boxes = {b.attempt: b for b in self.store.boxes(include_destroyed=True, run_ids=[run.id])}
        attempts = []
        live_cost = 0.0
        for a in self.store.attempts(run.id):
            b = boxes.get(a.n)
            cost = box_cost(b) if b else a.cost
            if b and b.state != "destroyed":
                live_cost += cost - (a.cost or 0.0)
            attempts.append(
                AttemptInfo(
                    attempt=a.n,
                    box_id=a.box_id,
                    provider=b.provider if b else None,
                    instance_id=b.instance_id if b else None,
                    host=b.host_id if b else None,
                    price_per_hour=b.price_per_hour if b else None,
                    started_at=a.started_at,
                    ended_at=a.ended_at,
                    end_reason=a.end_reason,
                    exit_code=a.exit_code,
                    resumed_from_step=a.resumed_from_step,
                    last_step=a.last_step,
                    cost=round(cost, 6),
                    error=a.traceback_tail,
                )
            )
        return RunInfo(
            run_id=run.id,
            owner=run.owner,
            name=run.name,
            state=RunState(run.state),
            reason=run.reason,
            spec=spec,
            created_at=run.created_at,
            updated_at=run.updated_at,
            attempts=attempts,
            cost=round(run.cost + max(0.0, live_cost), 6),
            gpus=spec.gpus,
            provider=spec.provider,
        )

    async def rpc_get_run(self, env: Envelope) -> RunInfo:
        assert self.store is not None
        q = env.event(RunQuery)
        run = self.store.run(q.run_id or "")
        if run is None or (q.owner and run.owner != q.owner):
            raise NotFound(f"no run {q.run_id}")
        return self.run_info(run)

    async def rpc_list_runs(self, env: Envelope) -> RunList:
        assert self.store is not None
        q = env.event(RunQuery)
        runs = self.store.list_runs(
            owner=q.owner,
            states=[s.value for s in q.states],
            name=q.name,
            limit=max(1, min(q.limit, 500)),
            before=q.before,
        )
        infos = [self.run_info(r) for r in runs]
        return RunList(runs=infos, next_before=runs[-1].created_at if len(runs) == q.limit else None)

    async def rpc_offers(self, env: Envelope) -> OfferList:
        assert self.driver is not None
        q = env.event(OffersQuery)
        spec = parse_gpu_spec(q.gpus)
        offers = await self.driver.provider(q.provider).search_offers(
            spec, OfferFilters(max_price_per_hour=q.max_price)
        )
        return OfferList(offers=[o.model_dump(mode="json") for o in offers[: q.limit]])

    async def rpc_boxes(self, env: Envelope) -> BoxList:
        assert self.store is not None and self.driver is not None
        q = env.event(BoxQuery)
        run_ids = None
        if q.owner:
            run_ids = [
                r.id for r in self.store.list_runs(owner=q.owner, states=[], name=None, limit=10_000, before=None)
            ]
        rows = []
        for b in self.store.boxes(include_destroyed=q.include_destroyed, run_ids=run_ids):
            age = (now() - b.created_at).total_seconds()
            rows.append(
                {
                    "box_id": b.id,
                    "provider": b.provider,
                    "instance_id": b.instance_id,
                    "state": b.state,
                    "price_per_hour": b.price_per_hour,
                    "run_id": b.run_id,
                    "attempt": b.attempt,
                    "host": b.host_id,
                    "age_s": round(age, 1),
                    "cost": box_cost(b),
                    "pid": self._local_pid(b),
                }
            )
        return BoxList(boxes=rows)

    def _local_pid(self, box: object) -> int | None:
        from .models import Box

        assert isinstance(box, Box)
        if box.provider != "local" or not box.instance_id or box.state == "destroyed":
            return None
        try:
            from .providers import localbox

            info = localbox.read_box(self.settings.home / "boxes" / box.instance_id)
        except Exception:
            return None
        return getattr(info, "pid", None)
