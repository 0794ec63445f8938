"""The run and box lifecycle: one driver task per active run, state in the database.

``queued -> provisioning -> syncing -> running <-> paused -> finishing -> succeeded | failed |
cancelled``, and ``running -> recovering -> provisioning`` when a box is lost.

A driver reads the run's row and takes the next step for its state; handlers of NATS messages
(attempt ended, heartbeats, control commands) only record facts and wake the driver, so every
transition is made in one place with a guarded update. A provisioner killed at any moment
finds the same rows when it restarts and continues: a box row is written *before* the provider
is asked to create the instance, and the instance carries the box id as a label, so an instance
created just before a crash is adopted, never rented twice. Fault barriers mark the moments
tests crash at: ``provision.after_create``, ``provision.before_bootstrap``,
``provision.mid_bootstrap``.

A box is **lost** when it has been silent for ``loss_timeout_s`` **and** the provider says it
is not running or a fresh direct SSH probe fails. A dropped tunnel alone is not a loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import shlex
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from choline_core.bus import Bus
from choline_core.errors import CholineError, NoCapacity, ProviderError, ProvisioningFailed
from choline_core.events import (
    BoxEvent,
    RunSpec,
    RunState,
    RunStateChanged,
)
from choline_core.faults import abarrier
from choline_core.natsauth import NatsAuth
from choline_core.pipeline import AgentConfig, BoxEndpoints
from choline_core.settings import SECRETS_DIR
from choline_core.specs import parse_gpu_spec
from choline_core.subjects import Subjects

from . import bootstrap
from .models import Box, Run, now
from .providers.base import (
    LABEL_BOX,
    LABEL_INSTALLATION,
    LABEL_RUN,
    InstanceRequest,
    InstanceState,
    InstanceUnavailable,
    Provider,
    SshEndpoint,
)
from .providers.offers import Offer, OfferFilters
from .providers.registry import get_provider
from .settings import ProvisionerSettings
from .sshclient import KeyPair, SshError, delete_run_key, ensure_run_key, load_run_key
from .store import Store, box_cost

log = logging.getLogger(__name__)

#: Providers whose every box is on one machine: losing a box says nothing about the host, so
#: recovery may (must) use the same host again.
SINGLE_HOST_PROVIDERS = {"local"}


class RunDriver:
    """Drives every active run of this provisioner."""

    def __init__(
        self, settings: ProvisionerSettings, store: Store, bus: Bus, subjects: Subjects, *, nats_port: int, s3_port: int
    ) -> None:
        self.settings = settings
        self.store = store
        self.bus = bus
        self.subjects = subjects
        self.me = f"prov-{secrets.token_hex(4)}"
        self.nats_dest = ("127.0.0.1", nats_port)
        self.s3_dest = ("127.0.0.1", s3_port)
        self.providers: dict[str, Provider] = {}
        self.sessions: dict[str, bootstrap.BoxSession] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.wakers: dict[str, asyncio.Event] = {}
        self.heartbeats: dict[str, float] = {}  # box id -> monotonic time of the last heartbeat
        self.phases: dict[str, str] = {}
        self._hb_written: dict[str, float] = {}
        self.creds_written: dict[str, float] = {}
        self._agent_checked: set[tuple[str, str]] = set()
        self._stopping = False

    # ------------------------------------------------------------------ plumbing
    def provider(self, name: str) -> Provider:
        if name not in self.providers:
            options: dict[str, Any] = {}
            if name in ("local", "ssh"):
                options["home"] = self.settings.home
            if name == "local" and self.settings.local_base_python:
                options["base_python"] = self.settings.local_base_python
            if name == "vast":
                options["api_key"] = self.settings.secret("vast_api_key")
                if self.settings.vast_url:
                    options["server_url"] = self.settings.vast_url
            self.providers[name] = get_provider(name, **options)
        return self.providers[name]

    async def drop_tunnels(self) -> int:
        """Drop every box's SSH connection and tunnels, as a network blip on this side would; each
        keeper reconnects on its own (``kill -USR1`` on the provisioner does this)."""
        sessions = list(self.sessions.values())
        for session in sessions:
            await session.drop()
        log.warning("dropped the SSH connections and tunnels of %d box(es)", len(sessions))
        return len(sessions)

    def wake(self, run_id: str) -> None:
        ev = self.wakers.get(run_id)
        if ev is not None:
            ev.set()

    async def sleep(self, run_id: str, seconds: float) -> None:
        ev = self.wakers.setdefault(run_id, asyncio.Event())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(ev.wait(), seconds)
        ev.clear()

    def ensure_driver(self, run_id: str) -> None:
        task = self.tasks.get(run_id)
        if task is None or task.done():
            self.wakers.setdefault(run_id, asyncio.Event())
            self.tasks[run_id] = asyncio.create_task(self._drive(run_id), name=f"run:{run_id}")

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self.tasks.values()):
            task.cancel()
        for task in list(self.tasks.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for session in list(self.sessions.values()):
            await session.close()
        for provider in self.providers.values():
            with contextlib.suppress(Exception):
                await provider.close()

    async def publish_state(self, run: Run, previous: str | None, reason: str | None) -> None:
        await self.bus.publish(
            self.subjects.run_events(run.id),
            RunStateChanged(
                run_id=run.id,
                state=RunState(run.state),
                previous=RunState(previous) if previous else None,
                reason=reason,
                attempt=run.attempts or None,
            ),
        )

    async def set_state(self, run: Run, state: RunState, reason: str | None = None, **values: Any) -> bool:
        """Guarded transition; publishes ``run.state_changed``. ``False``: the row moved on meanwhile."""
        previous = run.state
        if not self.store.update_run(run, state=state.value, reason=reason, **values):
            return False
        log.info(
            "run %s: %s -> %s%s",
            run.id,
            previous,
            state.value,
            f" ({reason})" if reason else "",
            extra={"run_id": run.id},
        )
        await self.publish_state(run, previous, reason)
        return True

    # ------------------------------------------------------------------ the driver loop
    async def _drive(self, run_id: str) -> None:
        lease = timedelta(seconds=self.settings.lease_s)
        while not self._stopping:
            run = self.store.run(run_id)
            if run is None or RunState(run.state).terminal:
                break
            if not self.store.claim(run, self.me, lease):
                await self.sleep(run_id, self.settings.lease_s / 3)
                continue
            try:
                await self.step(run)
            except asyncio.CancelledError:
                raise
            except CholineError as exc:
                log.warning("run %s: %s", run_id, exc.one_line(), extra={"run_id": run_id})
                await self.sleep(run_id, 2.0)
            except Exception:
                log.exception("run %s: driver step failed", run_id, extra={"run_id": run_id})
                await self.sleep(run_id, 2.0)
        self.wakers.pop(run_id, None)

    async def step(self, run: Run) -> None:
        state = RunState(run.state)
        log.debug("run %s: step in state %s", run.id, state.value)
        if run.pending_action == "cancel":
            await self.cancel(run)
        elif state is RunState.scheduled:
            await self.wait_schedule(run)
        elif state in (RunState.queued, RunState.recovering):
            await self.begin_attempt(run)
        elif state is RunState.provisioning:
            await self.provision(run)
        elif state in (RunState.syncing, RunState.running, RunState.pausing, RunState.finishing):
            await self.watch(run)
        elif state is RunState.paused:
            await self.sleep(run.id, 30.0)

    # ------------------------------------------------------------------ schedules
    async def wait_schedule(self, run: Run) -> None:
        sched = self.store.schedule(run.id)
        spec = RunSpec.model_validate_json(run.spec_json)
        due = sched is None or sched.start_at is None or sched.start_at <= now()
        if due and sched is not None and sched.max_price is not None and spec.provider:
            offers = await self.offers(spec, run)
            due = bool(offers) and offers[0].price_per_hour <= sched.max_price
            if not due:
                log.info("run %s waits for an offer under $%.3f/h", run.id, sched.max_price)
        if due:
            self.store.delete_schedule(run.id)
            await self.set_state(run, RunState.queued, "start time reached" if sched and sched.start_at else None)
        else:
            wait = 30.0
            if sched is not None and sched.start_at is not None:
                wait = max(0.2, min(wait, (sched.start_at - now()).total_seconds()))
            await self.sleep(run.id, wait)

    # ------------------------------------------------------------------ attempts
    async def begin_attempt(self, run: Run) -> None:
        spec = RunSpec.model_validate_json(run.spec_json)
        if run.attempts >= spec.max_attempts:
            await self.set_state(run, RunState.failed, f"gave up after {run.attempts} attempts")
            return
        if spec.budget is not None and run.cost >= spec.budget:
            await self.set_state(run, RunState.failed, f"budget of ${spec.budget:.2f} spent (${run.cost:.2f})")
            return
        n = run.attempts + 1
        self.store.add_attempt(run.id, n)
        await self.set_state(run, RunState.provisioning, None, attempts=n)

    async def offers(self, spec: RunSpec, run: Run) -> list[Offer]:
        gpu = parse_gpu_spec(spec.gpus)
        filters = OfferFilters(max_price_per_hour=spec.max_price, exclude_hosts=frozenset(self.store.lost_hosts(run)))
        return await self.provider(spec.provider).search_offers(gpu, filters)

    def labels(self, run_id: str, box_id: str) -> dict[str, str]:
        return {LABEL_INSTALLATION: self.settings.installation_id, LABEL_RUN: run_id, LABEL_BOX: box_id}

    async def provision(self, run: Run) -> None:
        spec = RunSpec.model_validate_json(run.spec_json)
        provider = self.provider(spec.provider)
        n = run.attempts
        box = self.store.box_for(run.id, n)
        tried: list[str] = []
        if box is None:
            offers = await self.offers(spec, run)
            if not offers:
                why = f"no {spec.provider} offer matches {spec.gpus}"
                if spec.max_price is not None:
                    why += f" under ${spec.max_price:.2f}/h"
                await self.end_without_box(run, RunState.failed, why)
                return
            box = self.store.add_box(
                Box(
                    id=f"b{secrets.token_hex(6)}",
                    run_id=run.id,
                    attempt=n,
                    provider=spec.provider,
                    state="creating",
                    offer_id=offers[0].offer_id,
                    host_id=offers[0].host_id,
                    price_per_hour=offers[0].price_per_hour,
                )
            )
            self.store.update_attempt(run.id, n, box_id=box.id)
        key = await asyncio.to_thread(ensure_run_key, run.id, home=self.settings.home)
        while box.state == "creating":
            if box.instance_id is None:
                adopted = await provider.list_instances(self.labels(run.id, box.id))
                if adopted:
                    log.info("box %s: adopting instance %s created before a restart", box.id, adopted[0].instance_id)
                    self.store.update_box(box, instance_id=adopted[0].instance_id, state="created")
                    break
                offer = await self._pick_offer(spec, run, box, tried)
                if offer is None:
                    await self.release_box(box, "no offer could be rented")
                    await self.end_without_box(
                        run, RunState.failed, f"no {spec.provider} box could be rented ({'; '.join(tried)})"
                    )
                    return
                request = InstanceRequest(ssh_public_key=key.public_key, labels=self.labels(run.id, box.id))
                try:
                    instance_id = await provider.create_instance(offer, request)
                except (NoCapacity, ProvisioningFailed) as exc:
                    tried.append(f"{offer.offer_id}: {exc.message}")
                    self.store.update_box(box, offer_id=None)
                    continue
                await abarrier("provision.after_create")
                self.store.update_box(
                    box,
                    instance_id=instance_id,
                    state="created",
                    offer_id=offer.offer_id,
                    host_id=offer.host_id,
                    price_per_hour=offer.price_per_hour,
                )
                await self.bus.publish(
                    self.subjects.run_events(run.id),
                    BoxEvent(
                        box_id=box.id,
                        run_id=run.id,
                        kind="created",
                        provider=spec.provider,
                        instance_id=instance_id,
                        host=offer.host_id,
                        price_per_hour=offer.price_per_hour,
                    ),
                )
        if box.state == "created":
            assert box.instance_id is not None
            try:
                endpoint = await provider.wait_until_running(box.instance_id, timeout=self.settings.boot_timeout_s)
            except ProvisioningFailed as exc:
                await self._retry_elsewhere(run, box, provider, f"instance never ran: {exc.message}")
                return
            self.store.update_box(
                box, state="booted", ssh_host=endpoint.host, ssh_port=endpoint.port, ssh_user=endpoint.user
            )
        if box.state == "booted":
            await abarrier("provision.before_bootstrap")
            try:
                await self.bootstrap_box(run, spec, box, key, provider)
            except (SshError, ProvisioningFailed, InstanceUnavailable) as exc:
                await self._retry_elsewhere(run, box, provider, f"bootstrap failed: {exc.one_line()}")
                return
        if box.state == "ready":
            await self.set_state(run, RunState.syncing)

    async def _pick_offer(self, spec: RunSpec, run: Run, box: Box, tried: list[str]) -> Offer | None:
        if len(tried) >= self.settings.max_offers_per_attempt:
            return None
        offers = await self.offers(spec, run)
        used = {t.split(":", 1)[0] for t in tried}
        for offer in offers:
            if offer.offer_id not in used or spec.provider in SINGLE_HOST_PROVIDERS:
                return offer
        return None

    async def _retry_elsewhere(self, run: Run, box: Box, provider: Provider, why: str) -> None:
        """The box cannot be used: destroy it and start the attempt over on another offer."""
        log.warning("run %s box %s: %s; destroying it", run.id, box.id, why, extra={"run_id": run.id})
        await self.release_box(box, why)
        self.store.end_attempt(run.id, box.attempt, end_reason=why, cost=box_cost(box))
        if box.host_id and box.provider not in SINGLE_HOST_PROVIDERS:
            self._mark_host_lost(run, box.host_id)
        run = self.store.run(run.id) or run
        await self.set_state(run, RunState.recovering, why)

    def _mark_host_lost(self, run: Run, host: str) -> None:
        hosts = self.store.lost_hosts(run)
        if host not in hosts:
            hosts.append(host)
            self.store.update_run(run, lost_hosts=json.dumps(hosts))

    async def bootstrap_box(self, run: Run, spec: RunSpec, box: Box, key: KeyPair, provider: Provider) -> None:
        assert box.instance_id is not None
        endpoint = await provider.ssh_endpoint(box.instance_id)
        session = await self.session(box, endpoint, key)
        conn = session.conn
        assert conn is not None
        python, workdir = await bootstrap.prepare_box(conn, run.id, box.attempt)
        # a local box runs the base environment every local box shares: one check is enough
        agent_key = (box.provider, box.host_id or "") if box.provider == "local" else None
        creds_task = asyncio.create_task(self.write_box_creds(conn, workdir, run.id, box.id))
        if agent_key is None or agent_key not in self._agent_checked:
            await bootstrap.ensure_agent(conn, python, self.settings.home)
            if agent_key is not None:
                self._agent_checked.add(agent_key)
        creds = await creds_task
        if self.settings.public_nats_url:
            nats_url = self.settings.public_nats_url
            s3_endpoint = self.settings.public_s3_endpoint or self.settings.s3_endpoint
        else:
            assert session.tunnels is not None
            nats_url = f"nats://127.0.0.1:{session.tunnels.nats_port}"
            s3_endpoint = f"http://127.0.0.1:{session.tunnels.s3_port}"
        config = AgentConfig(
            run_id=run.id,
            attempt=box.attempt,
            box_id=box.id,
            workdir=workdir,
            nats_url=nats_url,
            nats_creds=creds,
            inbox_prefix=self.subjects.inbox_prefix(box.id) if creds else None,
            # local boxes are folders on this machine: they share one cache of built environments and
            # datasets, as the disk of a rented machine does across the runs it serves
            envs_dir=str(self.settings.home / "box-cache" / "envs") if box.provider == "local" else None,
            datasets_dir=str(self.settings.home / "box-cache" / "data") if box.provider == "local" else None,
            subject_prefix=self.subjects.prefix,
            script=spec.script,
            args=spec.args,
            code_digest=spec.code_digest,
            env_digest=spec.env_digest,
            env=spec.env,
            data=spec.data,
            gpus=parse_gpu_spec(spec.gpus).count,
            distributed=spec.distributed,
            heartbeat_s=self.settings.heartbeat_s,
        )
        # the syncer must know the box's S3 endpoint before the agent asks for its first URL
        await self.bus.publish(
            self.subjects.run_events(run.id),
            BoxEndpoints(run_id=run.id, attempt=box.attempt, box_id=box.id, nats_url=nats_url, s3_endpoint=s3_endpoint),
        )
        pid = await bootstrap.start_agent(conn, python, config, faults=self.settings.agent_faults)
        self.store.update_box(
            box,
            state="ready",
            workdir=workdir,
            pid=pid,
            ready_at=now(),
            nats_port=session.tunnels.nats_port if session.tunnels else None,
            s3_port=session.tunnels.s3_port if session.tunnels else None,
        )
        self.heartbeats.setdefault(box.id, time.monotonic())
        await self.bus.publish(
            self.subjects.run_events(run.id),
            BoxEvent(
                box_id=box.id,
                run_id=run.id,
                kind="ready",
                provider=box.provider,
                instance_id=box.instance_id,
                host=box.host_id,
                price_per_hour=box.price_per_hour,
            ),
        )

    async def write_box_creds(self, conn: Any, workdir: str, run_id: str, box_id: str) -> str | None:
        """Mint this box's NATS credentials (its run's subjects only, expiring) and put them on the
        box (0600). ``None`` when NATS runs without operator mode (a test server)."""
        auth = NatsAuth.load(self.settings.home / SECRETS_DIR)
        if auth is None:
            return None
        text = auth.box_creds(self.subjects.prefix, run_id, box_id, ttl_s=self.settings.box_creds_ttl_s)
        path = f"{workdir}/nats.creds"
        await conn.run(
            f"umask 077 && cat > {shlex.quote(path)}.tmp && mv {shlex.quote(path)}.tmp {shlex.quote(path)}",
            input=text,
            timeout=30,
            check=True,
        )
        self.creds_written[box_id] = time.monotonic()
        return path

    async def session(self, box: Box, endpoint: SshEndpoint, key: KeyPair) -> bootstrap.BoxSession:
        """The open SSH session of a box, opened (with its tunnels on their recorded ports) if needed."""
        session = self.sessions.get(box.id)
        if session is not None and session.conn is not None and not session.conn.closed:
            return session
        if session is not None:
            await session.close()
        direct = bool(self.settings.public_nats_url)
        session = bootstrap.BoxSession(
            box.id,
            endpoint,
            key,
            nats_dest=None if direct else self.nats_dest,
            s3_dest=None if direct else self.s3_dest,
            connect_timeout=self.settings.bootstrap_timeout_s,
        )
        await session.open(nats_port=box.nats_port, s3_port=box.s3_port)
        session.keep()
        self.sessions[box.id] = session
        return session

    # ------------------------------------------------------------------ a running attempt
    async def watch(self, run: Run) -> None:
        box = self.store.box_for(run.id, run.attempts)
        attempt = self.store.attempt(run.id, run.attempts)
        if attempt is not None and attempt.ended_at is not None:
            await self.finish_attempt(run, box)
            return
        if box is None or box.state not in ("ready",):
            await self.sleep(run.id, self.settings.watch_interval_s)
            return
        if box.id not in self.sessions and box.instance_id:
            # a restarted provisioner: re-open the tunnels on the ports the agent knows
            try:
                provider = self.provider(box.provider)
                endpoint = await provider.ssh_endpoint(box.instance_id)
                key = await asyncio.to_thread(load_run_key, run.id, home=self.settings.home)
                await self.session(box, endpoint, key)
            except (CholineError, OSError) as exc:
                log.warning("box %s: cannot re-open its session yet: %s", box.id, exc)
        session = self.sessions.get(box.id)
        written = self.creds_written.get(box.id)
        if (
            session is not None
            and session.conn is not None
            and box.workdir
            and (written is None or time.monotonic() - written > self.settings.box_creds_ttl_s / 2)
        ):
            try:  # renew before expiry: the agent reads the file again when it reconnects
                await self.write_box_creds(session.conn, box.workdir, run.id, box.id)
            except (CholineError, OSError) as exc:
                log.warning("box %s: cannot renew its NATS credentials yet: %s", box.id, exc)
        if RunState(run.state) is RunState.syncing and self.phases.get(box.id) == "training":
            await self.set_state(run, RunState.running)
        spec = RunSpec.model_validate_json(run.spec_json)
        if spec.budget is not None and run.cost + box_cost(box) >= spec.budget:
            self.store.update_run(run, pending_action="cancel")
            await self.cancel(run, reason=f"budget of ${spec.budget:.2f} reached")
            return
        last = self.heartbeats.get(box.id)
        if last is None:
            ref = box.last_heartbeat_at or box.ready_at or box.created_at
            last = time.monotonic() - max(0.0, (now() - ref).total_seconds())
            self.heartbeats[box.id] = last
        silent = time.monotonic() - last
        log.debug("run %s box %s: silent %.1fs", run.id, box.id, silent)
        timeout = self.loss_timeout(box)
        if silent > timeout:
            reason = await self.confirm_loss(box)
            if reason:
                await self.lose_box(run, box, f"box lost: silent {silent:.0f}s and {reason}")
                return
            await self.revive_agent(box)
            self.heartbeats[box.id] = time.monotonic() - timeout / 2  # check again soon
        await self.sleep(run.id, self.settings.watch_interval_s)

    def loss_timeout(self, box: Box) -> float:
        """How long a box may be silent before it is checked: a local box has no network between it
        and the control plane, so its silence means something sooner."""
        if box.provider in SINGLE_HOST_PROVIDERS:
            return min(self.settings.loss_timeout_s, self.settings.local_loss_timeout_s)
        return self.settings.loss_timeout_s

    async def confirm_loss(self, box: Box) -> str | None:
        """Why a silent box is lost (the provider or an SSH probe says so), or ``None`` if it is not."""
        assert box.instance_id is not None
        provider = self.provider(box.provider)
        try:
            state = await provider.status(box.instance_id)
        except ProviderError as exc:
            state = InstanceState.UNKNOWN
            log.warning("box %s: provider cannot be asked: %s", box.id, exc.one_line())
        if state in (InstanceState.OFFLINE, InstanceState.EXITED, InstanceState.GONE):
            return f"the provider reports it {state.value}"
        try:
            endpoint = await provider.ssh_endpoint(box.instance_id)
            key = await asyncio.to_thread(load_run_key, box.run_id, home=self.settings.home)
        except (CholineError, OSError) as exc:
            return f"no SSH endpoint ({exc})"
        if not await bootstrap.probe(endpoint, key, self.settings.probe_timeout_s):
            return "a direct SSH probe failed"
        log.warning("box %s silent but alive (provider %s, SSH answers): tunnels, not the box", box.id, state.value)
        return None

    async def revive_agent(self, box: Box) -> None:
        """The box answers but its agent is silent: start the agent again if it died (it carries
        on with the attempt: its journal and the script's checkpoints are on the box)."""
        session = self.sessions.get(box.id)
        if session is None or session.conn is None or session.conn.closed or not box.workdir:
            return
        try:
            if await bootstrap.running_agent(session.conn, box.workdir):
                return
            python = await bootstrap.box_python(session.conn)
            pid = await bootstrap.launch_agent(session.conn, python, box.workdir, faults=self.settings.agent_faults)
        except (CholineError, OSError) as exc:
            log.warning("box %s: cannot check or restart its agent: %s", box.id, exc)
            return
        log.warning("box %s: the agent was not running; restarted it (pid %d)", box.id, pid)
        self.store.update_box(box, pid=pid)

    async def lose_box(self, run: Run, box: Box, reason: str) -> None:
        log.warning("run %s: %s", run.id, reason, extra={"run_id": run.id, "box_id": box.id})
        self.store.update_box(box, state="lost", reason=reason)
        await self.bus.publish(
            self.subjects.run_events(run.id),
            BoxEvent(
                box_id=box.id,
                run_id=run.id,
                kind="lost",
                provider=box.provider,
                instance_id=box.instance_id,
                host=box.host_id,
                reason=reason,
            ),
        )
        self.store.end_attempt(run.id, box.attempt, end_reason=reason)
        await self.release_box(box, reason)
        if box.host_id and box.provider not in SINGLE_HOST_PROVIDERS:
            self._mark_host_lost(run, box.host_id)
        run = self.store.run(run.id) or run
        await self._account(run)
        run = self.store.run(run.id) or run
        if run.pending_action == "pause":
            await self.set_state(run, RunState.paused, "paused (the box was lost first)", pending_action=None)
        else:
            await self.set_state(run, RunState.recovering, reason)

    async def finish_attempt(self, run: Run, box: Box | None) -> None:
        """The attempt ended (its AttemptEnded arrived): release the box and decide the run's next state."""
        attempt = self.store.attempt(run.id, run.attempts)
        assert attempt is not None
        if box is not None:
            await self.release_box(box, attempt.end_reason or "attempt ended")
        await self._account(run)
        run = self.store.run(run.id) or run
        spec = RunSpec.model_validate_json(run.spec_json)
        reason = attempt.end_reason or ""
        if run.pending_action == "cancel":
            await self.set_state(run, RunState.cancelled, "cancelled", pending_action=None)
        elif reason == "succeeded":
            await self.set_state(run, RunState.succeeded, None, pending_action=None)
        elif reason == "stopped":  # stopped on request: a final checkpoint, the results kept
            await self.set_state(run, RunState.succeeded, "stopped on request", pending_action=None)
        elif reason == "cancelled":
            await self.set_state(run, RunState.cancelled, "cancelled", pending_action=None)
        elif reason == "paused":
            await self.set_state(run, RunState.paused, "paused by request", pending_action=None)
        elif reason.startswith(("box lost", "bootstrap failed")):
            await self.set_state(run, RunState.recovering, reason)
        elif reason == "lost":  # the agent died mid-script: a new attempt resumes from the last checkpoint
            await self.set_state(run, RunState.recovering, f"attempt lost: {attempt.traceback_tail or 'no reason'}")
        elif run.retries_used < spec.retries:
            await self.set_state(
                run,
                RunState.recovering,
                f"{reason}; retry {run.retries_used + 1} of {spec.retries}",
                retries_used=run.retries_used + 1,
            )
        else:
            await self.set_state(
                run,
                RunState.failed,
                failure_reason(reason, attempt.exit_code, attempt.traceback_tail),
                pending_action=None,
            )
        run = self.store.run(run.id) or run
        if RunState(run.state).terminal:
            await asyncio.to_thread(delete_run_key, run.id, home=self.settings.home)

    async def _account(self, run: Run) -> None:
        boxes = self.store.boxes(include_destroyed=True, run_ids=[run.id])
        total = round(sum(box_cost(b) for b in boxes), 6)
        for b in boxes:
            self.store.update_attempt(run.id, b.attempt, cost=box_cost(b))
        fresh = self.store.run(run.id)
        if fresh is not None:
            self.store.update_run(fresh, cost=total)

    async def release_box(self, box: Box, reason: str) -> None:
        """Destroy the box's instance (idempotent) and close its session."""
        session = self.sessions.pop(box.id, None)
        if session is not None:
            await session.close()
        fresh = self.store.box(box.id) or box
        if fresh.state == "destroyed":
            return
        if fresh.instance_id:
            provider = self.provider(fresh.provider)
            for attempt in range(5):
                try:
                    await provider.destroy_instance(fresh.instance_id)
                    break
                except ProviderError as exc:
                    log.warning("box %s: destroy failed (%s); retrying", fresh.id, exc.one_line())
                    await asyncio.sleep(min(2.0**attempt, 10.0))
            else:
                log.error("box %s: could not destroy instance %s; the reaper will retry", fresh.id, fresh.instance_id)
                return
        self.store.update_box(fresh, state="destroyed", destroyed_at=now(), reason=fresh.reason or reason)
        self.heartbeats.pop(box.id, None)
        self.phases.pop(box.id, None)
        await self.bus.publish(
            self.subjects.run_events(box.run_id),
            BoxEvent(
                box_id=box.id,
                run_id=box.run_id,
                kind="destroyed",
                provider=fresh.provider,
                instance_id=fresh.instance_id,
                reason=reason,
            ),
        )

    async def end_without_box(self, run: Run, state: RunState, reason: str) -> None:
        self.store.end_attempt(run.id, run.attempts, end_reason=reason)
        await self.set_state(run, state, reason)

    async def cancel(self, run: Run, reason: str = "cancelled") -> None:
        box = self.store.box_for(run.id, run.attempts) if run.attempts else None
        if box is not None and box.state != "destroyed":
            await self.release_box(box, reason)
        if run.attempts:
            self.store.end_attempt(run.id, run.attempts, end_reason=reason)
        await self._account(run)
        run = self.store.run(run.id) or run
        self.store.delete_schedule(run.id)
        state = RunState.cancelled if reason == "cancelled" else RunState.failed
        await self.set_state(run, state, reason, pending_action=None)
        await asyncio.to_thread(delete_run_key, run.id, home=self.settings.home)

    # ------------------------------------------------------------------ facts from messages
    def on_heartbeat(self, box_id: str, phase: str | None) -> None:
        t = time.monotonic()
        self.heartbeats[box_id] = t
        if phase:
            previous = self.phases.get(box_id)
            self.phases[box_id] = phase
            if phase != previous:
                box = self.store.box(box_id)
                if box is not None:
                    self.wake(box.run_id)
        if t - self._hb_written.get(box_id, 0.0) > 10.0:
            self._hb_written[box_id] = t
            self.store.touch_box(box_id, last_heartbeat_at=now())

    # ------------------------------------------------------------------ the reaper
    async def reap(self) -> int:
        """Destroy every instance labelled with this installation that no live box row owns."""
        live = {b.id for b in self.store.live_boxes()}
        names = {"local"} | {b.provider for b in self.store.boxes(include_destroyed=True)}
        reaped = 0
        for name in sorted(names):
            try:
                instances = await self.provider(name).list_instances(
                    {LABEL_INSTALLATION: self.settings.installation_id}
                )
            except CholineError as exc:
                log.warning("reaper: cannot list %s instances: %s", name, exc.one_line())
                continue
            for inst in instances:
                if inst.labels.get(LABEL_BOX) in live:
                    continue
                log.warning(
                    "reaper: destroying %s instance %s (box %s, owned by no live run)",
                    name,
                    inst.instance_id,
                    inst.labels.get(LABEL_BOX),
                )
                try:
                    await self.provider(name).destroy_instance(inst.instance_id)
                    reaped += 1
                except CholineError as exc:
                    log.warning("reaper: destroy of %s failed: %s", inst.instance_id, exc.one_line())
        return reaped


def failure_reason(reason: str, exit_code: int | None, tail: str | None) -> str:
    """One line saying why an attempt failed: the script's exit code and its error's last line, or
    what went wrong setting the run up (code, environment) when the script never ran."""
    lines = [line.strip() for line in (tail or "").splitlines() if line.strip()]
    if exit_code is not None:
        why = f"the script exited with code {exit_code}"
        if lines:
            why += f": {lines[-1][:300]}"
        return why
    if reason and reason not in ("failed", "succeeded"):
        return reason
    if lines:
        return f"the run could not start: {lines[0][:300]}"
    return "the attempt failed"


async def periodic(interval: float, fn: Callable[[], Awaitable[Any]], name: str) -> None:
    while True:
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed", name)
        await asyncio.sleep(interval)
