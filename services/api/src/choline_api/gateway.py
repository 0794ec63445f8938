"""What the gateway does, below the routers: runs, control, logs, metrics, and the RPCs to the
services that own the data.

Routers stay thin: they parse the request, call one method here and return its result. Access
is decided here, once: a user sees only their own runs (an admin sees every run); another
user's run answers 404, exactly like a run that does not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, TypeVar

from nats.aio.msg import Msg
from pydantic import ValidationError

from choline_core import pipeline, rpc
from choline_core.bus import Bus
from choline_core.errors import BadSpec, Bug, BusError, Conflict, NotFound
from choline_core.events import (
    AttemptStarted,
    ControlAction,
    ControlCommand,
    Envelope,
    Event,
    FindingRaised,
    RunRequested,
    RunSpec,
    RunState,
    RunStateChanged,
)
from choline_core.specs import parse_gpu_spec
from choline_core.subjects import Subjects

from .ingest import Notifier, metrics_key
from .keys import StreamTokens
from .metrics import MetricStore
from .models import (
    ArtifactFilePublic,
    ArtifactPage,
    AttemptPage,
    CheckpointPage,
    CodePublic,
    ControlPublic,
    FindingPage,
    FindingPublic,
    LogLinePublic,
    RunPage,
    RunPublic,
    SeriesPublic,
    StreamTokenCreated,
    WebhookEvent,
)
from .settings import PROVIDERS, ApiSettings
from .store import ApiStore, LocalRun, Principal, new_run_id
from .webhooks import PING, DeliveryWorker, WebhookStore

log = logging.getLogger(__name__)

R = TypeVar("R", bound=Event)
T = TypeVar("T")

_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
FOLLOW_PAGE = 500
FOLLOW_POINTS = 5000
FOLLOW_COALESCE_S = 0.25
PING_EVERY_S = 15.0
UNSEEN_WINDOW = timedelta(minutes=10)


def sse(event: str, data: Any, id: int | str | None = None) -> str:
    head = f"id: {id}\n" if id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, default=str)}\n\n"


class Gateway:
    def __init__(
        self,
        store: ApiStore,
        bus: Bus,
        settings: ApiSettings,
        notifier: Notifier,
        stopping: asyncio.Event,
        *,
        metrics: MetricStore,
        webhooks: WebhookStore,
        worker: DeliveryWorker,
        stream_tokens: StreamTokens,
    ) -> None:
        self.store = store
        self.bus = bus
        self.settings = settings
        self.subjects: Subjects = bus.subjects
        self.notifier = notifier
        self.stopping = stopping
        self.metrics = metrics
        self.webhooks = webhooks
        self.worker = worker
        self.stream_tokens = stream_tokens
        self._owners: dict[str, str] = {}

    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Database work in a worker thread (the store is synchronous)."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def call(self, service: str, method: str, request: Event, reply: type[R]) -> R:
        """One request/reply to ``service``; its error replies come back as their CholineError."""
        try:
            env = await self.bus.request(
                self.subjects.rpc(service, method), request, timeout=self.settings.api_rpc_timeout
            )
        except BusError as exc:
            raise BusError(
                f"the {service} is not answering ({method}): {exc.message}", hint="check 'choline status'"
            ) from exc
        rpc.raise_for_error(env)
        if env.type != reply.TYPE:
            raise Bug(f"the {service} answered {method} with a {env.type!r} message, not {reply.TYPE!r}")
        return env.event(reply)

    # ------------------------------------------------------------------ runs
    @staticmethod
    def check_spec(spec: RunSpec) -> None:
        """Refuse what the provisioner could never run, before anything is queued."""
        parse_gpu_spec(spec.gpus)
        if spec.provider not in PROVIDERS:
            raise BadSpec(f"unknown provider {spec.provider!r}", hint=f"one of: {', '.join(PROVIDERS)}")
        if not spec.script.strip():
            raise BadSpec("the run has no script", hint="name the script to run, e.g. train.py")
        for what, value in (("max_price", spec.max_price), ("budget", spec.budget)):
            if value is not None and not value > 0:
                raise BadSpec(f"{what} must be a positive number of dollars, not {value}")
        if spec.max_attempts < 1 or spec.retries < 0:
            raise BadSpec("max_attempts must be at least 1 and retries at least 0")
        if spec.name is not None and not 0 < len(spec.name) <= 256:
            raise BadSpec("a run's name is 1 to 256 characters")

    async def create_run(self, user: Principal, spec: RunSpec, client_key: str | None = None) -> RunPublic:
        self.check_spec(spec)
        if client_key:
            found = await self.db(self.store.find_by_client_key, user.user, client_key)
            if found is not None:
                return self._public_local(found)
        run_id = new_run_id()
        local = await self.db(self.store.add_run, run_id, user.user, spec, client_key)
        if local.run_id != run_id:  # the same Idempotency-Key raced us in
            return self._public_local(local)
        event = RunRequested(run_id=run_id, owner=user.user, spec=spec)
        # the envelope's time is the run's creation time, the same on the gateway and the provisioner
        env = event.envelope(id=f"run-requested-{run_id}").model_copy(update={"ts": local.created_at})
        try:
            await self.bus.publish(self.subjects.provision("requests"), env)
        except BusError:
            await self.db(self.store.delete_run, run_id)
            raise
        log.info(
            "run %s requested by %s (%s on %s)", run_id, user.user, spec.gpus, spec.provider, extra={"run_id": run_id}
        )
        return self._public_local(local)

    @staticmethod
    def _public_local(local: LocalRun) -> RunPublic:
        return RunPublic(
            run_id=local.run_id,
            owner=local.owner,
            name=local.name,
            state=local.state or RunState.queued,
            reason=local.reason,
            spec=local.spec,
            created_at=local.created_at,
            updated_at=local.updated_at or local.created_at,
            gpus=local.spec.gpus,
            provider=local.spec.provider,
        )

    @staticmethod
    def _not_found(run_id: str) -> NotFound:
        return NotFound(f"no run {run_id}", hint="see 'choline ls'")

    async def get_run(self, user: Principal, run_id: str) -> RunPublic:
        if not _RUN_ID_RE.match(run_id):
            raise self._not_found(run_id)
        query = rpc.RunQuery(run_id=run_id, owner=None if user.admin else user.user)
        try:
            info = await self.call(rpc.PROVISIONER, rpc.GET_RUN, query, rpc.RunInfo)
        except NotFound:
            local = await self.db(self.store.get_run, run_id)
            if local is None or not (user.admin or local.owner == user.user):
                raise self._not_found(run_id) from None
            return self._public_local(local)
        if not (user.admin or info.owner == user.user):
            raise self._not_found(run_id)
        return RunPublic.from_info(info)

    async def list_runs(
        self,
        user: Principal,
        *,
        states: list[RunState],
        name: str | None,
        limit: int,
        before: datetime | None,
    ) -> RunPage:
        owner = None if user.admin else user.user
        query = rpc.RunQuery(owner=owner, states=states, name=name, limit=limit, before=before)
        page = await self.call(rpc.PROVISIONER, rpc.LIST_RUNS, query, rpc.RunList)
        runs = [RunPublic.from_info(i) for i in page.runs if user.admin or i.owner == user.user]
        if not states or RunState.queued in states:
            # Runs this gateway queued that the provisioner has not announced yet (no state event),
            # recent ones only, in this page's window. The provisioner announces a run as soon as
            # it accepts it, so this covers the moment between `choline run` and that event.
            seen = {r.run_id for r in runs}
            after = datetime.now(timezone.utc) - UNSEEN_WINDOW
            if page.next_before is not None:
                after = max(after, page.next_before)
            unseen = await self.db(self.store.unseen_runs, owner, before=before, after=after, name=name, limit=limit)
            runs += [self._public_local(r) for r in unseen if r.run_id not in seen]
        runs.sort(key=lambda r: r.created_at, reverse=True)
        next_before = page.next_before
        if len(runs) > limit:
            runs = runs[:limit]
            next_before = runs[-1].created_at
        return RunPage(runs=runs, next_before=next_before)

    async def ensure_access(self, user: Principal, run_id: str) -> None:
        """Return when ``user`` may see ``run_id``; NotFound otherwise (also for others' runs)."""
        if not _RUN_ID_RE.match(run_id):
            raise self._not_found(run_id)
        owner = await self.db(self.store.owner_of, run_id)
        if owner is not None:
            if user.admin or owner == user.user:
                return
            raise self._not_found(run_id)
        await self.get_run(user, run_id)  # a run the provisioner knows but this gateway did not queue

    async def control(
        self, user: Principal, run_id: str, action: ControlAction, params: dict[str, Any]
    ) -> ControlPublic:
        if action == ControlAction.set and not params:
            raise BadSpec("'set' needs parameters", hint="e.g. lr=3e-4 epochs=+5")
        try:
            run = await self.get_run(user, run_id)
        except BusError:
            # The provisioner is away: the command is durable, so queue it for a run this user owns.
            owner = await self.db(self.store.owner_of, run_id)
            if owner is None or not (user.admin or owner == user.user):
                raise
        else:
            if run.state.terminal:
                raise Conflict(f"run {run_id} has already {run.state.value}", hint=f"'choline show {run_id}'")
        command = ControlCommand(run_id=run_id, action=action, params=params, by=user.user)
        env = command.envelope()
        await self.bus.publish(self.subjects.run_control(run_id), env)
        log.info("%s %s by %s", action.value, run_id, user.user, extra={"run_id": run_id, "msg_id": env.id})
        return ControlPublic(command_id=env.id, run_id=run_id, action=action, params=params)

    # ------------------------------------------------------------------ run events (read model)
    async def handle_run_events(self, items: list[tuple[Msg, Envelope]]) -> list[Msg]:
        """A fetched batch of RUNS events, in order; returns the unreadable ones (terminated)."""
        bad: list[Msg] = []
        for msg, env in items:
            try:
                if env.run_id is not None and env.run_id != self.subjects.run_id_of(msg.subject):
                    raise ValueError(f"it names run {env.run_id}")
                await self.handle_run_event(env)
            except (ValueError, ValidationError) as exc:
                log.warning("rejecting a %s event on %s: %s", env.type, msg.subject, str(exc).splitlines()[0])
                bad.append(msg)
        return bad

    async def handle_run_event(self, env: Envelope) -> None:
        """RUNS stream: remember each run's state (and queue webhooks for it in the same
        transaction), wake its followers, and supersede points when an attempt resumes."""
        if env.type == RunStateChanged.TYPE:
            evt = env.event(RunStateChanged)
            if env.run_id is not None and evt.run_id != env.run_id:
                raise ValueError(f"its envelope is for run {env.run_id}, its event for {evt.run_id}")
            owner = name = None
            if await self.db(self.webhooks.any_active):
                owner, name = await self.run_owner(evt.run_id)
            data = {
                "run_id": evt.run_id,
                "name": name,
                "state": evt.state.value,
                "previous": evt.previous.value if evt.previous else None,
                "reason": evt.reason,
                "attempt": evt.attempt,
            }

            def outbox(session: Any, kind: str) -> None:
                if owner is not None:
                    self.webhooks.enqueue_in(session, owner, kind, env.id, env.ts, data)

            changed, kind = await self.db(
                self.store.apply_state, evt.run_id, evt.state, evt.reason, evt.attempt, env.ts, on_transition=outbox
            )
            if changed:
                self.notifier.notify(evt.run_id)
                self.notifier.notify(metrics_key(evt.run_id))
            if kind is not None and owner is not None:
                self.worker.wake()
        elif env.type == AttemptStarted.TYPE:
            started = env.event(AttemptStarted)
            marked = await self.db(
                self.metrics.attempt_started,
                started.run_id,
                started.attempt,
                started.resumed_from_step,
                started.box_id,
                env.ts,
            )
            if marked:
                log.info(
                    "run %s attempt %d resumed from step %d: %d earlier points superseded",
                    started.run_id,
                    started.attempt,
                    started.resumed_from_step,
                    marked,
                    extra={"run_id": started.run_id},
                )
            self.notifier.notify(metrics_key(started.run_id))

    async def run_owner(self, run_id: str) -> tuple[str | None, str | None]:
        """(owner, name) of a run: this gateway's record, else the provisioner's (admin query).
        A run nobody knows has no owner (its webhooks go nowhere)."""
        local = await self.db(self.store.get_run, run_id)
        if local is not None:
            return local.owner, local.name
        if run_id in self._owners:
            return self._owners[run_id], None
        try:
            info = await self.call(rpc.PROVISIONER, rpc.GET_RUN, rpc.RunQuery(run_id=run_id), rpc.RunInfo)
        except NotFound:
            return None, None
        if len(self._owners) > 10000:
            self._owners.clear()
        self._owners[run_id] = info.owner
        return info.owner, info.name

    async def handle_findings(self, items: list[tuple[Msg, Envelope]]) -> list[Msg]:
        """FINDINGS stream: queue ``finding.raised`` webhooks for the run's owner."""
        bad: list[Msg] = []
        for msg, env in items:
            if env.type != FindingRaised.TYPE:
                continue
            try:
                finding = env.event(FindingRaised)
            except (ValueError, ValidationError) as exc:
                log.warning("rejecting a finding on %s: %s", msg.subject, str(exc).splitlines()[0])
                bad.append(msg)
                continue
            if not await self.db(self.webhooks.any_active):
                continue
            owner, name = await self.run_owner(finding.run_id)
            if owner is None:
                continue
            data = {
                "run_id": finding.run_id,
                "name": name,
                "finding_id": finding.finding_id,
                "detector": finding.detector,
                "severity": finding.severity.value,
                "step": finding.step,
                "message": finding.message,
                "evidence": finding.evidence,
            }
            kind = WebhookEvent.finding_raised.value
            if await self.db(self.webhooks.enqueue, owner, kind, f"finding:{finding.finding_id}", env.ts, data):
                self.worker.wake()
        return bad

    async def handle_deployments(self, items: list[tuple[Msg, Envelope]]) -> list[Msg]:
        """``<p>.deploy.changed``: queue ``deployment.ready`` webhooks when a deployment is ready.

        ``DeploymentChanged`` names no owner yet; the deploy service is expected to add
        ``owner`` to its data (read here leniently), and until then ``admin`` owns deployments."""
        for msg, env in items:
            if env.type != "deploy.changed" or str(env.data.get("state", "")) != "ready":
                continue
            if not await self.db(self.webhooks.any_active):
                continue
            owner = str(env.data.get("owner") or "admin")
            data = {k: env.data.get(k) for k in ("name", "version", "state", "url", "reason")}
            event_id = f"deployment:{data['name']}:{data['version']}:ready"
            if await self.db(self.webhooks.enqueue, owner, WebhookEvent.deployment_ready.value, event_id, env.ts, data):
                self.worker.wake()
            log.debug("deployment %s ready (message %s)", data["name"], msg.subject)
        return []

    # ------------------------------------------------------------------ logs
    async def follow_logs(self, user: Principal, run_id: str, after_id: int = 0) -> AsyncIterator[str]:
        """Server-sent events: ``line`` for each stored line (id = its row id), ``state`` when the
        run's state changes, ``end`` once the run has ended and no line came for the grace time."""
        await self.ensure_access(user, run_id)
        return self._follow(run_id, after_id)

    async def _follow(self, run_id: str, after_id: int) -> AsyncIterator[str]:
        grace, poll = self.settings.api_follow_grace, self.settings.api_follow_poll
        yield "retry: 2000\n\n"
        last_state: RunState | None = None
        ended_at: float | None = None
        last_sent = time.monotonic()
        while not self.stopping.is_set():
            wake = self.notifier.event(run_id)
            rows = await self.db(self.store.log_lines_after_id, run_id, after_id, FOLLOW_PAGE)
            for row in rows:
                assert row.id is not None
                line = LogLinePublic.model_validate(row.model_dump(include=set(LogLinePublic.model_fields)))
                yield sse("line", line.model_dump(mode="json"), id=row.id)
                after_id = row.id
            if rows:
                last_sent = time.monotonic()
                if len(rows) == FOLLOW_PAGE:
                    continue
            state, reason = await self.db(self.store.run_state, run_id)
            if state is not None and state != last_state:
                yield sse("state", {"run_id": run_id, "state": state.value, "reason": reason})
                last_state, last_sent = state, time.monotonic()
            timeout = poll
            if state is not None and state.terminal:
                now = time.monotonic()
                if rows or ended_at is None:
                    ended_at = now
                elif now - ended_at >= grace:
                    yield sse("end", {"run_id": run_id, "state": state.value, "reason": reason})
                    return
                timeout = min(poll, max(0.05, grace - (now - ended_at)))
            if time.monotonic() - last_sent > PING_EVERY_S:
                yield ": ping\n\n"
                last_sent = time.monotonic()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout)

    # ------------------------------------------------------------------ attempts and findings
    async def attempts(self, user: Principal, run_id: str) -> AttemptPage:
        run = await self.get_run(user, run_id)
        return AttemptPage(run_id=run_id, attempts=sorted(run.attempts, key=lambda a: a.attempt))

    async def findings(self, user: Principal, run_id: str | None, limit: int) -> FindingPage:
        """A run's findings (``run_id``), or every finding of the caller's runs, newest first.

        From the monitor, which owns them. For all runs it answers its oldest 1000 at most (its
        RPC has no paging yet): this list covers those, filtered to the caller's runs."""
        if run_id is not None:
            await self.ensure_access(user, run_id)
        query = rpc.FindingsQuery(run_id=run_id, limit=1000)
        found = await self.call(rpc.MONITOR, rpc.FINDINGS, query, rpc.FindingList)
        out: list[FindingPublic] = []
        for raw in found.findings:
            try:
                finding = FindingPublic.model_validate(raw)
            except ValidationError:
                log.warning("skipping a finding the monitor sent in a shape this gateway cannot read")
                continue
            if run_id is not None and finding.run_id != run_id:
                continue
            out.append(finding)
        if run_id is None and not user.admin:
            owners = {r: (await self.run_owner(r))[0] for r in {f.run_id for f in out}}
            out = [f for f in out if owners.get(f.run_id) == user.user]
        epoch = datetime.min.replace(tzinfo=timezone.utc)
        out.sort(key=lambda f: (f.ts or f.created_at or epoch, f.id), reverse=True)
        return FindingPage(run_id=run_id, findings=out[:limit])

    # ------------------------------------------------------------------ chart series and live metrics
    async def series(
        self,
        user: Principal,
        run_id: str,
        key: str,
        *,
        max_points: int,
        start: int | None,
        end: int | None,
        include_superseded: bool,
    ) -> SeriesPublic:
        await self.ensure_access(user, run_id)
        if start is not None and end is not None and start > end:
            raise BadSpec(f"start ({start}) is after end ({end})")
        found = await self.db(
            self.metrics.series,
            run_id,
            key,
            max_points=max_points,
            start=start,
            end=end,
            include_superseded=include_superseded,
        )
        return SeriesPublic(
            run_id=run_id,
            key=key,
            resolution=found.resolution,
            source=found.source,
            start=found.start,
            end=found.end,
            step=found.step,
            last_step=found.last_step,
            min=found.min,
            max=found.max,
            last=found.last,
            count=found.count,
            nonfinite=found.nonfinite,
        )

    async def follow_metrics(
        self, user: Principal, run_id: str, keys: list[str], after: tuple[int, int]
    ) -> AsyncIterator[str]:
        """Server-sent events: ``points`` (columnar per key: step, value, attempt; id = the cursor
        ``attempt:seq``), ``attempt`` when points of a new attempt begin, ``state``, and ``end``."""
        await self.ensure_access(user, run_id)
        return self._follow_metrics(run_id, keys, after)

    async def _follow_metrics(self, run_id: str, keys: list[str], after: tuple[int, int]) -> AsyncIterator[str]:
        grace, poll = self.settings.api_follow_grace, self.settings.api_follow_poll
        yield "retry: 2000\n\n"
        attempt, seq = after
        last_state: RunState | None = None
        ended_at: float | None = None
        last_sent = time.monotonic()
        while not self.stopping.is_set():
            wake = self.notifier.event(metrics_key(run_id))
            rows = await self.db(self.metrics.points_after, run_id, keys, attempt, seq, FOLLOW_POINTS)
            if rows:
                by_key: dict[str, dict[str, list[Any]]] = {}
                for a, q, key, step, value, raw in rows:
                    if a != attempt:
                        yield sse("attempt", {"run_id": run_id, "attempt": a})
                    attempt, seq = a, q
                    col = by_key.setdefault(key, {"step": [], "value": [], "raw": [], "attempt": []})
                    col["step"].append(step)
                    col["value"].append(value)
                    col["raw"].append(raw)
                    col["attempt"].append(a)
                yield sse("points", {"run_id": run_id, "points": by_key}, id=f"{attempt}:{seq}")
                last_sent = time.monotonic()
                if len(rows) == FOLLOW_POINTS:
                    continue
            state, reason = await self.db(self.store.run_state, run_id)
            if state is not None and state != last_state:
                yield sse("state", {"run_id": run_id, "state": state.value, "reason": reason})
                last_state, last_sent = state, time.monotonic()
            timeout = poll
            if state is not None and state.terminal:
                now = time.monotonic()
                if rows or ended_at is None:
                    ended_at = now
                elif now - ended_at >= grace:
                    yield sse("end", {"run_id": run_id, "state": state.value, "reason": reason})
                    return
                timeout = min(poll, max(0.05, grace - (now - ended_at)))
            if time.monotonic() - last_sent > PING_EVERY_S:
                yield ": ping\n\n"
                last_sent = time.monotonic()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout)
            await asyncio.sleep(FOLLOW_COALESCE_S)  # one event per burst, not one per batch

    async def stream_token(self, user: Principal, run_id: str) -> StreamTokenCreated:
        await self.ensure_access(user, run_id)
        token, exp = self.stream_tokens.issue(user.user, user.token_id, run_id, self.settings.api_stream_token_ttl)
        return StreamTokenCreated(
            token=token,
            run_id=run_id,
            expires_at=datetime.fromtimestamp(exp, timezone.utc),
            logs_url=f"/v1/runs/{run_id}/logs?follow=1&stream_token={token}",
            metrics_url=f"/v1/runs/{run_id}/metrics/follow?stream_token={token}",
        )

    # ------------------------------------------------------------------ webhooks
    async def test_webhook(self, user: Principal, hook_id: str) -> str:
        hook = await self.db(self.webhooks.get, None if user.admin else user.user, hook_id)
        event_id = f"ping:{new_run_id()[1:]}"
        data = {"webhook_id": hook.id, "message": "a test delivery from choline"}
        await self.db(self.webhooks.enqueue, hook.owner, PING, event_id, datetime.now(timezone.utc), data, hook.id)
        self.worker.wake()
        return event_id

    # ------------------------------------------------------------------ checkpoints, artifacts, code
    async def checkpoints(self, user: Principal, run_id: str, include_deleted: bool = False) -> CheckpointPage:
        await self.ensure_access(user, run_id)
        query = pipeline.CheckpointsQuery(run_id=run_id, include_deleted=include_deleted)
        found = await self.call(rpc.SYNCER, pipeline.SYNCER_CHECKPOINTS, query, pipeline.CheckpointList)
        ordered = sorted(found.checkpoints, key=lambda c: (c.step, c.attempt), reverse=True)
        return CheckpointPage(run_id=run_id, checkpoints=ordered)

    async def artifacts(self, user: Principal, run_id: str) -> ArtifactPage:
        await self.ensure_access(user, run_id)
        query = pipeline.ArtifactsQuery(run_id=run_id)
        found = await self.call(rpc.SYNCER, pipeline.SYNCER_ARTIFACTS, query, pipeline.ArtifactList)
        files, bundle = [], None
        for a in found.artifacts:
            public = ArtifactFilePublic(path=a.path, size=a.size, sha256=a.sha256, attempt=a.attempt, url=a.url)
            if found.bundle is not None and a.path == found.bundle:
                bundle = public
            else:
                files.append(public)
        return ArtifactPage(run_id=run_id, files=files, bundle=bundle, logs=found.logs)

    async def code_upload(self, digest: str, kind: Literal["code", "env"]) -> CodePublic:
        query = pipeline.UploadQuery(digest=digest, kind=kind)
        found = await self.call(rpc.SYNCER, pipeline.SYNCER_UPLOAD, query, pipeline.UploadReply)
        return CodePublic(digest=digest, kind=kind, key=found.key, exists=found.exists, url=found.url)

    # ------------------------------------------------------------------ offers and boxes
    async def offers(self, gpus: str, provider: str, max_price: float | None, limit: int) -> rpc.OfferList:
        parse_gpu_spec(gpus)
        if provider not in PROVIDERS:
            raise BadSpec(f"unknown provider {provider!r}", hint=f"one of: {', '.join(PROVIDERS)}")
        if max_price is not None and not max_price > 0:
            raise BadSpec(f"max_price must be a positive number of dollars per hour, not {max_price}")
        query = rpc.OffersQuery(gpus=gpus, provider=provider, max_price=max_price, limit=limit)
        return await self.call(rpc.PROVISIONER, rpc.OFFERS, query, rpc.OfferList)

    async def boxes(self, user: Principal, include_destroyed: bool) -> rpc.BoxList:
        query = rpc.BoxQuery(owner=None if user.admin else user.user, include_destroyed=include_destroyed)
        found = await self.call(rpc.PROVISIONER, rpc.BOXES, query, rpc.BoxList)
        if not user.admin:  # the provisioner filters by owner already; never pass on another's box
            found.boxes = [b for b in found.boxes if b.get("owner", user.user) == user.user]
        return found
