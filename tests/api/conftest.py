"""Fixtures for the gateway's tests: the api service in-process on the real bus, and stand-ins.

- ``api``: ``ApiService`` run by ``run_service`` in this test's event loop (uvicorn on a free
  loopback port, a fresh subject prefix, SQLite under this test's CHOLINE_HOME);
  ``api_pg`` is the same on PostgreSQL in a schema of its own.
- ``http``: an ``httpx.AsyncClient`` on that port with the admin token the api wrote at its
  first start (``admin_token``).
- ``provisioner`` / ``syncer``: small stand-ins that answer the provisioner's and the syncer's
  RPCs on the real bus with the ``choline_core.rpc`` models. The real services are separate
  work; these exercise the contract (payloads, error replies) from the gateway's side. The
  provisioner stand-in learns runs from the ``RunRequested`` events the gateway publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from choline_api.main import ApiService
from choline_api.settings import ApiSettings
from choline_core import pipeline, rpc
from choline_core.bus import Bus
from choline_core.embedded import NatsServer
from choline_core.errors import NotFound
from choline_core.events import Envelope, RunRequested, RunState, RunStateChanged
from choline_core.subjects import Subjects
from choline_svc.service import run_service


def api_settings(nats: NatsServer, subjects: Subjects, home: Path, **extra: Any) -> ApiSettings:
    return ApiSettings(
        home=home,
        nats_url=nats.url,
        subject_prefix=subjects.prefix,
        api_rpc_timeout=3.0,
        api_follow_grace=1.0,
        api_follow_poll=0.2,
        **extra,
    )


@contextlib.asynccontextmanager
async def running(svc: ApiService) -> AsyncIterator[ApiService]:
    """Run ``svc`` as ``python -m choline_api`` would, until the block ends."""
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_service(svc, health_port=0, ready=ready, stop=stop))
    waiter = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiter.cancel()
        task.result()  # raises what start() raised
    assert waiter in done, "the api service did not become ready"
    try:
        yield svc
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def api(nats_server: NatsServer, subjects: Subjects, bus: Bus, choline_home: Path) -> AsyncIterator[ApiService]:
    async with running(ApiService(api_settings(nats_server, subjects, choline_home))) as svc:
        yield svc


@pytest.fixture
def admin_token(api: ApiService, choline_home: Path) -> str:
    return str(json.loads((choline_home / "secrets" / "token.json").read_text())["api_token"])


def base_url(svc: ApiService) -> str:
    return f"http://127.0.0.1:{svc.http_port}"


@pytest.fixture
async def http(api: ApiService, admin_token: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=base_url(api), headers={"Authorization": f"Bearer {admin_token}"}, timeout=10
    ) as client:
        yield client


async def new_user(http: httpx.AsyncClient, user: str) -> httpx.AsyncClient:
    """A client holding a fresh token of a new (non-admin) user."""
    resp = await http.post("/v1/tokens", json={"name": f"{user}-laptop", "user": user})
    assert resp.status_code == 201, resp.text
    return httpx.AsyncClient(
        base_url=str(http.base_url), headers={"Authorization": f"Bearer {resp.json()['token']}"}, timeout=10
    )


async def eventually(cond: Any, timeout: float = 10.0, every: float = 0.05) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = cond()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(every)


# =============================================================================================
# Stand-ins for the services behind the gateway
# =============================================================================================
class StandInProvisioner:
    """Answers the provisioner's RPCs from runs it learns from ``RunRequested`` events."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.runs: dict[str, rpc.RunInfo] = {}
        self.offers: list[dict[str, Any]] = [
            {"id": "local-1", "provider": "local", "gpus": "1xcpu", "price_per_hour": 0.0},
        ]
        self.boxes: list[dict[str, Any]] = []
        self.queries: list[Envelope] = []
        self.fail_with: dict[str, Exception] = {}

    async def start(self, *, learn: bool = True) -> StandInProvisioner:
        s = self.bus.subjects
        if learn:
            await self.bus.consume(f"standin-{uuid.uuid4().hex[:6]}", s.provision("requests"), self._on_request)
        for method, handler in (
            (rpc.GET_RUN, self._get_run),
            (rpc.LIST_RUNS, self._list_runs),
            (rpc.OFFERS, self._offers),
            (rpc.BOXES, self._boxes),
        ):
            await self.bus.serve(s.rpc(rpc.PROVISIONER, method), self._guard(method, handler), queue=rpc.PROVISIONER)
        return self

    def _guard(self, method: str, handler: Any) -> Any:
        async def wrapped(env: Envelope) -> Any:
            self.queries.append(env)
            if method in self.fail_with:
                raise self.fail_with[method]
            return await handler(env)

        return wrapped

    async def _on_request(self, env: Envelope) -> None:
        """Accept a run as the provisioner does: record it (created when the gateway queued it,
        the request's envelope time) and announce its first state."""
        req = env.event(RunRequested)
        self.runs[req.run_id] = rpc.RunInfo(
            run_id=req.run_id,
            owner=req.owner,
            name=req.spec.name,
            state=RunState.queued,
            spec=req.spec,
            created_at=env.ts,
            updated_at=datetime.now(timezone.utc),
            gpus=req.spec.gpus,
            provider=req.spec.provider,
        )
        await self.set_state(req.run_id, RunState.provisioning)

    async def set_state(self, run_id: str, state: RunState, reason: str | None = None) -> None:
        """Move a run and publish the RunStateChanged event, as the provisioner does."""
        info = self.runs[run_id]
        previous = info.state
        info.state, info.reason = state, reason
        await self.bus.publish(
            self.bus.subjects.run_events(run_id),
            RunStateChanged(run_id=run_id, state=state, previous=previous, reason=reason),
        )

    async def _get_run(self, env: Envelope) -> rpc.RunInfo:
        q = env.event(rpc.RunQuery)
        info = self.runs.get(q.run_id or "")
        if info is None or (q.owner is not None and info.owner != q.owner):
            raise NotFound(f"no run {q.run_id}")
        return info

    async def _list_runs(self, env: Envelope) -> rpc.RunList:
        q = env.event(rpc.RunQuery)
        runs = [
            r
            for r in sorted(self.runs.values(), key=lambda r: r.created_at, reverse=True)
            if (q.owner is None or r.owner == q.owner)
            and (not q.states or r.state in q.states)
            and (not q.name or (r.name and q.name in r.name))
            and (q.before is None or r.created_at < q.before)
        ]
        page = runs[: q.limit]
        return rpc.RunList(runs=page, next_before=page[-1].created_at if len(runs) > q.limit else None)

    async def _offers(self, env: Envelope) -> rpc.OfferList:
        q = env.event(rpc.OffersQuery)
        return rpc.OfferList(offers=[o for o in self.offers if o["provider"] == q.provider][: q.limit])

    async def _boxes(self, env: Envelope) -> rpc.BoxList:
        q = env.event(rpc.BoxQuery)
        return rpc.BoxList(boxes=[b for b in self.boxes if q.owner is None or b.get("owner") == q.owner])


class StandInSyncer:
    """Answers the syncer's RPCs (``choline_core.pipeline``) from lists the test fills in."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.checkpoints: dict[str, list[pipeline.CheckpointInfo]] = {}
        self.artifacts: dict[str, pipeline.ArtifactList] = {}
        self.stored: set[str] = set()

    async def start(self) -> StandInSyncer:
        s = self.bus.subjects
        for method, handler in (
            (pipeline.SYNCER_CHECKPOINTS, self._checkpoints),
            (pipeline.SYNCER_ARTIFACTS, self._artifacts),
            (pipeline.SYNCER_UPLOAD, self._upload),
        ):
            await self.bus.serve(s.rpc(rpc.SYNCER, method), handler, queue=rpc.SYNCER)
        return self

    async def _checkpoints(self, env: Envelope) -> pipeline.CheckpointList:
        q = env.event(pipeline.CheckpointsQuery)
        found = [c for c in self.checkpoints.get(q.run_id, []) if q.include_deleted or c.deleted_at is None]
        return pipeline.CheckpointList(run_id=q.run_id, checkpoints=sorted(found, key=lambda c: (c.step, c.attempt)))

    async def _artifacts(self, env: Envelope) -> pipeline.ArtifactList:
        q = env.event(pipeline.ArtifactsQuery)
        return self.artifacts.get(q.run_id) or pipeline.ArtifactList(run_id=q.run_id, artifacts=[])

    async def _upload(self, env: Envelope) -> pipeline.UploadReply:
        q = env.event(pipeline.UploadQuery)
        key = pipeline.code_key(q.digest) if q.kind == "code" else pipeline.env_key(q.digest)
        if key in self.stored:
            return pipeline.UploadReply(key=key, exists=True)
        return pipeline.UploadReply(key=key, exists=False, url=f"http://s3.invalid/{key}?sig=x")


@pytest.fixture
async def provisioner(bus: Bus) -> StandInProvisioner:
    return await StandInProvisioner(bus).start()


@pytest.fixture
async def syncer(bus: Bus) -> StandInSyncer:
    return await StandInSyncer(bus).start()


# =============================================================================================
# A real HTTP server on loopback that receives webhooks
# =============================================================================================
class Receiver:
    """A threaded HTTP server on 127.0.0.1 that records each POST and answers with the next
    status of ``statuses`` (then 200). ``stop()`` closes the port; ``start()`` reopens the same one."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.received: list[dict[str, Any]] = []
        self.statuses: list[int] = []
        self._server: Any = None
        self._thread: Any = None

    def start(self) -> Receiver:
        import http.server
        import threading

        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                receiver.received.append(
                    {
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body,
                        "status": status,
                    }
                )
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def delivered(self) -> list[dict[str, Any]]:
        return [r for r in self.received if 200 <= r["status"] < 300]


@pytest.fixture
def receiver() -> Any:
    r = Receiver().start()
    yield r
    r.stop()
