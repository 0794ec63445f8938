"""Fixtures for the syncer's tests: the real service (``run_service``) in the test's event loop, against the
test's own NATS prefix, S3 bucket and database, plus helpers that play a box (presigned PUT/GET over HTTP).

``plane`` is shared with ``tests/agent`` (which imports it from here)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import threading
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from choline_core.bus import Bus
from choline_core.embedded import NatsServer, WeedServer
from choline_core.events import Envelope, Event
from choline_core.rpc import raise_for_error
from choline_core.storage import S3Store
from choline_core.subjects import Subjects
from choline_svc.service import run_service
from choline_syncer.main import SyncerService
from choline_syncer.settings import SyncerSettings


@contextlib.asynccontextmanager
async def running(service: SyncerService, timeout: float = 30.0) -> AsyncIterator[SyncerService]:
    """The service between ready and a drained stop, as ``python -m choline_syncer`` runs it."""
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_service(service, health_port=0, ready=ready, stop=stop))
    waiter = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiter.cancel()
        task.result()
        raise AssertionError("the syncer exited before it was ready")
    if waiter not in done:
        task.cancel()
        raise AssertionError("the syncer was not ready in time")
    try:
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout)


async def eventually(check: Callable[[], Any | Awaitable[Any]], timeout: float = 15.0, what: str = "") -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.05)


def http_put(url: str, data: bytes) -> int:
    req = urllib.request.Request(url, data=data, method="PUT", headers={"Content-Length": str(len(data))})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return int(resp.status)


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        data: bytes = resp.read()
        return data


class Forwarder:
    """A TCP port forward on 127.0.0.1 (what the provisioner's SSH tunnel is to a box): a different port,
    the same S3 behind it. ``cut()`` drops the listener and every connection (the tunnel or S3 is gone);
    ``restore()`` listens on the same port again."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.connections = 0
        self.refused = 0
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self.port = 0
        self.server = self._listen()

    def _listen(self) -> socket.socket:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(16)
        self.port = server.getsockname()[1]
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        return server

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            self.connections += 1
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        self.server.close()
        with self._lock:
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._open.clear()

    def restore(self) -> None:
        self.server = self._listen()

    def close(self) -> None:
        self.cut()


@dataclass
class Plane:
    """The control plane's side of a test: NATS, S3, the syncer, a connected bus."""

    nats: NatsServer
    s3: WeedServer
    store: S3Store
    subjects: Subjects
    bus: Bus
    syncer: SyncerService

    async def box_request(self, run_id: str, method: str, event: Event) -> Envelope:
        """A request as a box of ``run_id`` makes it (on its run's subject)."""
        return await self.bus.request(self.subjects.run_request(run_id, method), event, timeout=10)

    async def rpc(self, method: str, event: Event) -> Envelope:
        return raise_for_error(await self.bus.request(self.subjects.rpc("syncer", method), event, timeout=10))

    def put_code(self, tar_gz: bytes) -> str:
        digest = hashlib.sha256(tar_gz).hexdigest()
        self.store.put_bytes(f"code/{digest}.tar.gz", tar_gz)
        return digest

    def put_env(self, spec_bytes: bytes) -> str:
        digest = hashlib.sha256(spec_bytes).hexdigest()
        self.store.put_bytes(f"envs/{digest}.json", spec_bytes)
        return digest

    async def read_stream(self, subject: str, timeout: float = 2.0) -> list[Envelope]:
        """Every message stored under ``subject`` when called (an ephemeral pull consumer)."""
        sub = await self.bus.js.pull_subscribe(subject, durable=None, stream=self.subjects.stream_for(subject))
        out: list[Envelope] = []
        try:
            want = (await sub.consumer_info()).num_pending or 0
            while len(out) < want:
                try:
                    msgs = await sub.fetch(min(256, want - len(out)), timeout=timeout)
                except Exception:
                    break
                for m in msgs:
                    out.append(Envelope.parse(m.data))
                    await m.ack()
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return out


def syncer_settings(
    nats: NatsServer, s3: WeedServer, store: S3Store, subjects: Subjects, db_url: str
) -> SyncerSettings:
    return SyncerSettings(
        nats_url=nats.url,
        subject_prefix=subjects.prefix,
        s3_endpoint=s3.endpoint,
        s3_access_key=s3.access_key,
        s3_secret_key=s3.secret_key,
        s3_bucket=store.bucket,
        database_url=db_url,
        log_level="WARNING",
    )


@pytest.fixture
async def plane(
    nats_server: NatsServer, s3_server: WeedServer, store: S3Store, subjects: Subjects, bus: Bus, sqlite_url: str
) -> AsyncIterator[Plane]:
    service = SyncerService(syncer_settings(nats_server, s3_server, store, subjects, sqlite_url))
    async with running(service):
        yield Plane(nats_server, s3_server, store, subjects, bus, service)


@pytest.fixture
def forwarder(s3_server: WeedServer) -> Iterator[Forwarder]:
    fwd = Forwarder(s3_server.s3_port)
    yield fwd
    fwd.close()


def new_run() -> str:
    return f"r{uuid.uuid4().hex[:10]}"


def manifest_bytes(step: int, files: dict[str, bytes], **extra: Any) -> bytes:
    entries = [{"path": k, "size": len(v), "sha256": hashlib.sha256(v).hexdigest()} for k, v in sorted(files.items())]
    body = {"format": "choline-checkpoint/1", "step": step, "created": 1.0, "files": entries, **extra}
    return json.dumps(body).encode()
