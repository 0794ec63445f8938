"""The deploy service process: ``python -m choline_deploy``. Owns deployments (``deploy_*`` tables).

- gateway/CLI: ``<p>.rpc.deploy.deploy|deployments|undeploy|rollback|route`` (core NATS, queue ``deploy``;
  contracts in ``choline_core.deploy``);
- events: ``DeploymentChanged`` on ``<p>.deploy.changed`` (with ``owner``) at every state change; the
  gateway turns ``ready`` into ``deployment.ready`` webhooks.

A rollout (deploy, a new version, rollback) starts the new version's replicas beside the old ones, waits
until every new one answers ``/readyz``, switches the route, waits ``deploy_switch_grace_s`` and only then
tells the old replicas to drain (SIGTERM: they answer what they received and exit). Requests therefore
always have a ready replica behind them. A new version that does not come up is stopped; the old replicas
keep serving and the deployment says why.

A watch loop checks every replica each ``deploy_check_interval_s``: a process that exited is started again;
one that stops answering ``/readyz`` ``deploy_unhealthy_after`` times in a row is killed and started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import delete, text
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from choline_core import deploy as c
from choline_core.errors import BadSpec, BusError, CholineError, NotFound
from choline_core.events import DeploymentChanged, Envelope
from choline_core.rpc import raise_for_error
from choline_core.settings import CholineSettings
from choline_core.storage import S3Store
from choline_svc.db import database_url, make_engine, migrate, session
from choline_svc.service import Service

from .boxes import BoxRunner, check_provider
from .local import LocalRunner
from .models import DeploymentRow, ReplicaRow, aware, utcnow
from .settings import DeploySettings

log = logging.getLogger(__name__)

QUEUE = "deploy"


class DeployService(Service):
    name = "deploy"
    settings_cls = DeploySettings
    settings: DeploySettings
    db_name = "deploy"

    def __init__(self, settings: CholineSettings | None = None) -> None:
        if settings is not None and not isinstance(settings, DeploySettings):
            settings = DeploySettings(**settings.model_dump())
        super().__init__(settings)
        self.engine: Engine | None = None
        self.runner: LocalRunner | None = None
        self.boxes: BoxRunner | None = None
        self.http: httpx.AsyncClient | None = None
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watch: asyncio.Task[None] | None = None
        self._failures: dict[str, int] = {}  # replica id -> failed readiness checks in a row
        self._retried: dict[str, float] = {}  # replica id -> when a failed replica was last tried again

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        assert self.bus is not None
        s = self.settings
        self.engine = make_engine(database_url(s, self.db_name), self.db_name)
        await asyncio.to_thread(migrate, self.engine, "choline_deploy.migrations")
        objects = S3Store.from_settings(s)
        self.runner = LocalRunner(s.path("deploy"), objects, s.deploy_python)
        key = BoxRunner.load_key(s.home, s.secret("deploy_key"))
        self.boxes = BoxRunner(self.bus, self.subjects, objects, key, s.deploy_box_bind)
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=2.0))
        handlers: dict[str, Callable[[Envelope], Awaitable[Envelope]]] = {
            c.DEPLOY_CREATE: self.rpc_deploy,
            c.DEPLOYMENTS: self.rpc_list,
            c.UNDEPLOY: self.rpc_undeploy,
            c.ROLLBACK: self.rpc_rollback,
            c.ROUTE: self.rpc_route,
        }
        for method, handler in handlers.items():
            await self.bus.serve(self.subjects.rpc(QUEUE, method), self.timed(method, handler), queue=QUEUE)
        await self._resume()
        self._watch = asyncio.create_task(self._watch_loop(), name="deploy-watch")

    async def stop(self) -> None:
        """A graceful stop (``choline down``, a container stop) drains and stops the serving processes of this
        machine, so none outlives the control plane holding a port; their rows stay, and the next start serves
        them again (the watch loop restarts a replica whose process is gone). A crash of this service leaves
        them running, and the restarted service adopts them. Replicas on rented boxes are left to their runs."""
        if self._watch is not None:
            self._watch.cancel()
        for t in list(self._tasks):
            t.cancel()
        if self.runner is not None and self.engine is not None:
            runner = self.runner
            with contextlib.suppress(Exception):
                rows = await asyncio.to_thread(self._rows, None)
                local = [r for _, reps in rows for r in reps if not r.run_id and r.pid]
                await asyncio.gather(
                    *(asyncio.to_thread(runner.stop, r.replica_id, r.pid, grace=10, forget=False) for r in local)
                )
        if self.http is not None:
            await self.http.aclose()
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

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _lock(self, owner: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault((owner, name), asyncio.Lock())

    # ------------------------------------------------------------------ database
    def _db(self) -> Engine:
        assert self.engine is not None
        return self.engine

    def _get(self, owner: str | None, name: str) -> DeploymentRow | None:
        with session(self._db()) as s:
            q = select(DeploymentRow).where(DeploymentRow.name == name)
            if owner is not None:
                q = q.where(DeploymentRow.owner == owner)
            row = s.exec(q).first()
            if row is not None:
                s.expunge(row)
            return row

    def _rows(self, owner: str | None, name: str | None = None) -> list[tuple[DeploymentRow, list[ReplicaRow]]]:
        with session(self._db()) as s:
            q = select(DeploymentRow)
            if owner is not None:
                q = q.where(DeploymentRow.owner == owner)
            if name is not None:
                q = q.where(DeploymentRow.name == name)
            deps = list(s.exec(q.order_by(DeploymentRow.name)).all())
            reps = list(s.exec(select(ReplicaRow)).all())
            for r in [*deps, *reps]:
                s.expunge(r)
        return [(d, [r for r in reps if (r.owner, r.name) == (d.owner, d.name)]) for d in deps]

    def _save(self, *rows: Any) -> None:
        with session(self._db()) as s:
            for r in rows:
                s.merge(r)

    def _replicas(self, owner: str, name: str) -> list[ReplicaRow]:
        with session(self._db()) as s:
            rows = list(s.exec(select(ReplicaRow).where(ReplicaRow.owner == owner, ReplicaRow.name == name)).all())
            for r in rows:
                s.expunge(r)
            return rows

    def _drop_replica(self, replica_id: str) -> None:
        with session(self._db()) as s:
            s.execute(delete(ReplicaRow).where(col(ReplicaRow.replica_id) == replica_id))

    def _drop_deployment(self, owner: str, name: str) -> None:
        with session(self._db()) as s:
            s.execute(delete(ReplicaRow).where(col(ReplicaRow.owner) == owner, col(ReplicaRow.name) == name))
            s.execute(delete(DeploymentRow).where(col(DeploymentRow.owner) == owner, col(DeploymentRow.name) == name))

    @staticmethod
    def _info(row: DeploymentRow, replicas: list[ReplicaRow]) -> c.DeploymentInfo:
        return c.DeploymentInfo(
            name=row.name,
            owner=row.owner,
            model=row.model,
            version=row.version,
            previous_version=row.previous_version,
            state=row.state,
            reason=row.reason,
            config=c.DeployConfig.model_validate_json(row.config),
            replicas=[
                c.ReplicaInfo(
                    replica_id=r.replica_id,
                    version=r.version,
                    state=r.state,
                    url=r.url,
                    pid=r.pid,
                    box_id=r.box_id,
                    run_id=r.run_id,
                    restarts=r.restarts,
                    error=r.error,
                )
                for r in sorted(replicas, key=lambda r: (r.version, r.replica_id))
            ],
            created_at=aware(row.created_at) or utcnow(),
            updated_at=aware(row.updated_at) or utcnow(),
        )

    async def _announce(self, row: DeploymentRow, url: str | None = None) -> None:
        assert self.bus is not None
        ev = DeploymentChanged(
            name=row.name, version=str(row.version), state=row.state, url=url, reason=row.reason, owner=row.owner
        )
        try:
            await self.bus.publish(self.subjects.deploy(c.CHANGED), ev)
        except Exception as exc:  # the deployment itself is fine; only the notice is late
            log.warning("deployment %s: cannot publish %s: %s", row.name, row.state, exc)

    async def _set_state(self, row: DeploymentRow, state: str, reason: str | None, url: str | None = None) -> None:
        row.state, row.reason, row.updated_at = state, reason, utcnow()
        await asyncio.to_thread(self._save, row)
        await self._announce(row, url)

    # ------------------------------------------------------------------ RPCs
    async def rpc_deploy(self, env: Envelope) -> Envelope:
        req = _parse(env, c.DeployRequest)
        name = req.name or req.model
        if not c.NAME_RE.match(name) or not c.NAME_RE.match(req.model):
            raise BadSpec(f"{name!r} is not a deployment name (letters, digits, '_', '.', '-')")
        if req.config.gpus:
            check_provider(req.config)
        model = await self._model(req.model, req.version, req.owner)
        async with self._lock(req.owner, name):
            row = await asyncio.to_thread(self._get, req.owner, name)
            now = utcnow()
            if row is None:
                row = DeploymentRow(
                    owner=req.owner, name=name, model=req.model, version=model.version, state="deploying",
                    config=req.config.model_dump_json(), created_at=now, updated_at=now,
                )  # fmt: skip
            else:
                if row.model != req.model:
                    raise BadSpec(
                        f"deployment {name!r} serves model {row.model!r}, not {req.model!r}",
                        hint=f"undeploy it first, or name this one: --name {req.model}-2",
                    )
                if row.version != model.version:
                    row.previous_version = row.version
                row.version, row.config, row.state, row.reason, row.updated_at = (
                    model.version, req.config.model_dump_json(), "deploying", None, now
                )  # fmt: skip
            await asyncio.to_thread(self._save, row)
        await self._announce(row)
        self._spawn(self._rollout(row.owner, name, model), f"rollout-{name}")
        reps = await asyncio.to_thread(self._replicas, row.owner, name)
        return self._info(row, reps).envelope()

    async def rpc_rollback(self, env: Envelope) -> Envelope:
        req = _parse(env, c.RollbackRequest)
        row = await asyncio.to_thread(self._get, req.owner, req.name)
        if row is None:
            raise NotFound(f"no deployment {req.name!r}", hint="'choline deployments ls' lists yours")
        if not row.previous_version:
            raise BadSpec(f"deployment {req.name!r} has no previous version to roll back to")
        config = c.DeployConfig.model_validate_json(row.config)
        request = c.DeployRequest(
            model=row.model, version=row.previous_version, owner=row.owner, name=row.name, config=config
        )
        return await self.rpc_deploy(request.envelope())

    async def rpc_list(self, env: Envelope) -> Envelope:
        q = _parse(env, c.DeploymentsQuery)
        found = await asyncio.to_thread(self._rows, q.owner, q.name)
        return c.DeploymentList(deployments=[self._info(d, r) for d, r in found]).envelope()

    async def rpc_route(self, env: Envelope) -> Envelope:
        q = _parse(env, c.RouteQuery)
        found = await asyncio.to_thread(self._rows, q.owner, q.name)
        if not found:
            raise NotFound(f"no deployment {q.name!r}", hint="'choline deployments ls' lists yours")
        row, reps = found[0]
        ready = [r for r in reps if r.state == "ready" and r.url]
        current = [r for r in ready if r.version == row.version]
        chosen = current or ready  # during a rollout the old version serves until the new one is ready
        if not chosen:
            from choline_core.errors import Retryable

            raise Retryable(f"deployment {q.name!r} has no ready replica ({row.state})", hint=row.reason or None)
        assert self.boxes is not None
        boxes = self.boxes
        picked = [r for r in chosen if r.url]
        tokens = [boxes.token(r.owner, r.name, r.version) if r.run_id else "" for r in picked]
        return c.Route(
            name=row.name, version=chosen[0].version, urls=[r.url or "" for r in picked], tokens=tokens
        ).envelope()

    async def rpc_undeploy(self, env: Envelope) -> Envelope:
        req = _parse(env, c.UndeployRequest)
        row = await asyncio.to_thread(self._get, req.owner, req.name)
        if row is None:
            raise NotFound(f"no deployment {req.name!r}", hint="'choline deployments ls' lists yours")
        async with self._lock(row.owner, row.name):
            reps = await asyncio.to_thread(self._replicas, row.owner, row.name)
            for r in reps:
                r.state = "draining"
            await asyncio.to_thread(self._save, *reps)
            await asyncio.gather(*(self._stop_replica(r) for r in reps))
            await asyncio.to_thread(self._drop_deployment, row.owner, row.name)
        row.state, row.reason, row.updated_at = "removed", "undeployed", utcnow()
        await self._announce(row)
        log.info("deployment %s/%s removed (%d replicas stopped)", row.owner, row.name, len(reps))
        return self._info(row, []).envelope()

    async def _model(self, model: str, version: int | None, owner: str) -> c.ModelVersionInfo:
        assert self.bus is not None
        try:
            reply = await self.bus.request(
                self.subjects.rpc(c.SYNCER, c.MODEL_GET),
                c.ModelGet(name=model, version=version, owner=owner),
                timeout=10,
            )
        except BusError as exc:
            raise BusError(f"the syncer is not answering: {exc.message}", hint="check 'choline status'") from exc
        raise_for_error(reply)
        return reply.event(c.ModelVersionInfo)

    # ------------------------------------------------------------------ replicas
    async def _start_replica(self, rep: ReplicaRow, model: c.ModelVersionInfo, config: c.DeployConfig) -> str:
        """Start (or restart) one replica and wait until it answers; returns its URL."""
        assert self.runner is not None
        runner = self.runner
        tarball = await asyncio.to_thread(runner.fetch, model.key, model.sha256)
        if config.gpus:
            return await self._start_box_replica(rep, model, config, tarball)
        rep.pid = await asyncio.to_thread(
            runner.start, rep.replica_id, tarball, name=rep.name, version=rep.version, config=config
        )
        rep.state, rep.url, rep.error = "starting", None, None
        await asyncio.to_thread(self._save, rep)
        deadline = asyncio.get_running_loop().time() + self.settings.deploy_ready_timeout_s
        while True:
            code = runner.exited(rep.replica_id, rep.pid)
            if code is not None:
                raise BadSpec(f"the serving process exited ({code}): {runner.log_tail(rep.replica_id)}")
            url = runner.ready_url(rep.replica_id)
            if url and await self._ready(url):
                rep.url, rep.state = url, "ready"
                await asyncio.to_thread(self._save, rep)
                return url
            if asyncio.get_running_loop().time() > deadline:
                await asyncio.to_thread(runner.kill, rep.replica_id, rep.pid)
                raise BadSpec(f"the serving process was not ready in {self.settings.deploy_ready_timeout_s:g} s")
            await asyncio.sleep(0.1)

    async def _start_box_replica(
        self, rep: ReplicaRow, model: c.ModelVersionInfo, config: c.DeployConfig, tarball: Path
    ) -> str:
        """A serving run on a rented box (``boxes``): queued, then watched until its ready line answers."""
        assert self.boxes is not None
        boxes = self.boxes
        rep.run_id = await boxes.start(owner=rep.owner, name=rep.name, model=model, config=config, tarball=tarball)
        rep.state, rep.url, rep.error, rep.pid = "starting", None, None, None
        await asyncio.to_thread(self._save, rep)
        deadline = asyncio.get_running_loop().time() + self.settings.deploy_box_ready_timeout_s
        while True:
            ended = await boxes.ended(rep.run_id)
            if ended is not None:
                raise BadSpec(f"the serving run {rep.run_id} ended before it served ({ended})")
            url = await boxes.ready_url(rep.run_id)
            if url and await self._ready(url):
                rep.url, rep.state = url, "ready"
                await asyncio.to_thread(self._save, rep)
                return url
            if asyncio.get_running_loop().time() > deadline:
                await boxes.stop(rep.run_id)
                raise BadSpec(f"the box was not serving in {self.settings.deploy_box_ready_timeout_s:g} s")
            await asyncio.sleep(1.0)

    async def _ready(self, url: str) -> bool:
        assert self.http is not None
        try:
            r = await self.http.get(f"{url}/readyz")
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    async def _stop_replica(self, rep: ReplicaRow) -> None:
        assert self.runner is not None and self.boxes is not None
        if rep.run_id:
            await self.boxes.stop(rep.run_id)
        await asyncio.to_thread(self.runner.stop, rep.replica_id, rep.pid)
        await asyncio.to_thread(self._drop_replica, rep.replica_id)
        self._failures.pop(rep.replica_id, None)

    async def _rollout(self, owner: str, name: str, model: c.ModelVersionInfo) -> None:
        async with self._lock(owner, name):
            row = await asyncio.to_thread(self._get, owner, name)
            if row is None or row.version != model.version:
                return  # undeployed, or a newer request took over
            config = c.DeployConfig.model_validate_json(row.config)
            old = await asyncio.to_thread(self._replicas, owner, name)
            new = [
                ReplicaRow(
                    replica_id=f"{name[:40]}-{model.version}-{secrets.token_hex(4)}",
                    owner=owner,
                    name=name,
                    version=model.version,
                    state="starting",
                    started_at=utcnow(),
                )
                for _ in range(config.replicas)
            ]
            await asyncio.to_thread(self._save, *new)
            results = await asyncio.gather(
                *(self._start_replica(r, model, config) for r in new), return_exceptions=True
            )
            errors = [e for e in results if isinstance(e, BaseException)]
            if errors:
                reason = f"version {model.version} did not start: {_one_line(errors[0])}"
                await asyncio.gather(*(self._stop_replica(r) for r in new))
                serving = [r for r in old if r.state == "ready"]
                if serving:  # the old version goes on serving
                    row.version = serving[0].version
                    if row.previous_version == row.version:  # the failed version is no one's previous
                        row.previous_version = None
                    await self._set_state(row, "ready", reason, serving[0].url)
                else:
                    await self._set_state(row, "failed", reason)
                log.warning("deployment %s/%s: %s", owner, name, reason)
                return
            await self._set_state(row, "ready", None, new[0].url)
            log.info("deployment %s/%s: version %d ready at %s", owner, name, model.version, new[0].url)
            if old:
                await asyncio.sleep(self.settings.deploy_switch_grace_s)  # routes the gateway cached expire
                for r in old:
                    r.state = "draining"
                await asyncio.to_thread(self._save, *old)
                await asyncio.gather(*(self._stop_replica(r) for r in old))

    async def _resume(self) -> None:
        """After a restart: unfinished rollouts are redone; live replicas are adopted by the watch loop."""
        for row, reps in await asyncio.to_thread(self._rows, None):
            for r in reps:
                if r.state in ("starting", "draining"):
                    assert self.runner is not None and self.boxes is not None
                    if r.run_id:
                        await self.boxes.stop(r.run_id, wait_s=5)
                    await asyncio.to_thread(self.runner.stop, r.replica_id, r.pid, grace=5)
                    await asyncio.to_thread(self._drop_replica, r.replica_id)
            if row.state == "deploying":
                with contextlib.suppress(CholineError):
                    model = await self._model(row.model, row.version, row.owner)
                    self._spawn(self._rollout(row.owner, row.name, model), f"rollout-{row.name}")

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.deploy_check_interval_s)
            try:
                await self._check_all()
            except Exception:
                log.exception("deploy watch: a check failed")

    async def _check_all(self) -> None:
        assert self.runner is not None
        for row, reps in await asyncio.to_thread(self._rows, None):
            for rep in reps:
                if self._lock(row.owner, row.name).locked():
                    continue
                if rep.state == "failed" and time.monotonic() - self._retried.get(rep.replica_id, 0.0) > 10.0:
                    self._retried[rep.replica_id] = time.monotonic()
                    self._spawn(self._restart(row, rep, rep.error or "it failed"), f"retry-{rep.replica_id}")
                    continue
                if rep.state != "ready":
                    continue
                if rep.run_id:
                    await self._check_box(row, rep)
                    continue
                code = self.runner.exited(rep.replica_id, rep.pid)
                if code is None and rep.url and await self._ready(rep.url):
                    self._failures.pop(rep.replica_id, None)
                    continue
                if code is None:
                    n = self._failures[rep.replica_id] = self._failures.get(rep.replica_id, 0) + 1
                    if n < self.settings.deploy_unhealthy_after:
                        continue
                    why = f"replica {rep.replica_id} stopped answering /readyz"
                    await asyncio.to_thread(self.runner.kill, rep.replica_id, rep.pid)
                else:
                    why = f"replica {rep.replica_id} exited ({code})"
                self._spawn(self._restart(row, rep, why), f"restart-{rep.replica_id}")

    async def _check_box(self, row: DeploymentRow, rep: ReplicaRow) -> None:
        """A box replica: its run ended -> a new run; its box lost -> the provisioner's new attempt serves
        again and prints a new ready line, whose URL replaces the old one."""
        assert self.boxes is not None and rep.run_id is not None
        if rep.url and await self._ready(rep.url):
            self._failures.pop(rep.replica_id, None)
            return
        ended = await self.boxes.ended(rep.run_id)
        if ended is not None:
            self._spawn(self._restart(row, rep, f"serving run {rep.run_id} {ended}"), f"restart-{rep.replica_id}")
            return
        url = await self.boxes.ready_url(rep.run_id)
        if url and url != rep.url and await self._ready(url):
            why = f"replica {rep.replica_id} moved to a new box ({url})"
            rep.url, rep.restarts = url, rep.restarts + 1
            await asyncio.to_thread(self._save, rep)
            self._failures.pop(rep.replica_id, None)
            current = await asyncio.to_thread(self._get, row.owner, row.name)
            if current is not None:
                await self._set_state(current, "ready", f"restored after: {why}", url)
            return
        n = self._failures[rep.replica_id] = self._failures.get(rep.replica_id, 0) + 1
        if n == self.settings.deploy_unhealthy_after:
            current = await asyncio.to_thread(self._get, row.owner, row.name)
            if current is not None and current.state == "ready":
                why = f"replica {rep.replica_id} on serving run {rep.run_id} is not answering (box being replaced?)"
                await self._set_state(current, "degraded", why)

    async def _restart(self, row: DeploymentRow, rep: ReplicaRow, why: str) -> None:
        async with self._lock(row.owner, row.name):
            current = await asyncio.to_thread(self._get, row.owner, row.name)
            if current is None:
                return
            self._failures.pop(rep.replica_id, None)
            rep.restarts += 1
            rep.state = "restarting"
            rep.error = why
            await asyncio.to_thread(self._save, rep)
            log.warning("deployment %s/%s: %s; starting it again", row.owner, row.name, why)
            await self._set_state(current, "degraded", why)
            if rep.run_id and self.boxes is not None:
                await self.boxes.stop(rep.run_id, wait_s=30)
            try:
                model = await self._model(current.model, rep.version, current.owner)
                config = c.DeployConfig.model_validate_json(current.config)
                url = await self._start_replica(rep, model, config)
            except Exception as exc:
                rep.state, rep.error = "failed", _one_line(exc)
                await asyncio.to_thread(self._save, rep)
                await self._set_state(current, "degraded", f"{why}; the restart failed: {_one_line(exc)}")
                return
            reps = await asyncio.to_thread(self._replicas, current.owner, current.name)
            if all(r.state == "ready" for r in reps):
                await self._set_state(current, "ready", f"restored after: {why}", url)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, CholineError):
        return exc.one_line()
    return f"{type(exc).__name__}: {exc}"


def _parse(env: Envelope, cls: type[Any]) -> Any:
    try:
        return env.event(cls)
    except ValueError as exc:
        raise BadSpec(f"not a {cls.TYPE}: {exc}") from None
