"""Fixtures for the worker-agent's tests: the control plane's side (``plane``: NATS, S3, the real syncer
in-process) and the agent as a real subprocess (``python -m choline_agent run --config agent.json``) with
a temporary box folder. No SSH here (the provisioner's tests cover it)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from choline_core.bus import Bus
from choline_core.embedded import NatsServer, WeedServer
from choline_core.events import Envelope
from choline_core.natsauth import NatsAuth
from choline_core.pipeline import AgentConfig
from choline_core.storage import S3Store
from choline_core.subjects import Subjects
from choline_syncer.main import SyncerService

from ..syncer.conftest import (  # noqa: F401
    Forwarder,
    Plane,
    eventually,
    forwarder,
    new_run,
    plane,
    running,
    syncer_settings,
)

SCRIPTS = Path(__file__).parent / "scripts"
# The interpreter the agent runs with: the agent must work on Python 3.10 with choline-core only, so point
# this at such an interpreter to check it (scripts still run on this venv's Python, which has torch).
AGENT_PYTHON = os.environ.get("CHOLINE_TEST_AGENT_PYTHON") or sys.executable


def bundle(files: dict[str, str | bytes], extra: list[tarfile.TarInfo] | None = None) -> bytes:
    """A gzip tarball of ``files`` (name -> content), as the CLI ships a working directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tf.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return buf.getvalue()


def script_bundle(*names: str, **more: str | bytes) -> bytes:
    files: dict[str, str | bytes] = {n: (SCRIPTS / n).read_text() for n in names}
    files.update(more)
    return bundle(files)


class AgentProcess:
    """``python -m choline_agent run --config <box>/agent.json`` as the provisioner starts it."""

    def __init__(self, config: AgentConfig, box: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.box = box
        self.workdir = Path(config.workdir)
        box.mkdir(parents=True, exist_ok=True)
        self.config_path = box / "agent.json"
        self.config_path.write_text(config.model_dump_json(indent=1))
        n = len(list(box.glob(f"agent-{config.attempt}*.log")))
        self.log_path = box / f"agent-{config.attempt}{f'-{n}' if n else ''}.log"
        full = dict(os.environ)
        full.update(env or {})
        full.setdefault("PIP_NO_INDEX", "1")  # tests never download packages
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [AGENT_PYTHON, "-m", "choline_agent", "run", "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full,
            start_new_session=True,
        )

    async def finished(self, timeout: float = 60.0) -> int:
        """The agent's exit code (never block the loop: the syncer runs in this test's event loop)."""
        deadline = time.monotonic() + timeout
        while (rc := self.proc.poll()) is None:
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGUSR1)  # the agent dumps its threads' stacks
                    os.kill(self.proc.pid, signal.SIGUSR2)  # and its tasks' ones
                await asyncio.sleep(0.5)
                raise AssertionError(f"the agent did not finish in {timeout:g}s:\n{self.log_tail(150)}")
            await asyncio.sleep(0.05)
        return rc

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def status(self) -> dict[str, Any]:
        try:
            data = json.loads((self.workdir / "status.json").read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        # a script the agent started is its own session: kill it too if it outlived the agent
        pid = self.status().get("script_pid")
        if isinstance(pid, int):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        self._log.close()


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    """Every agent a test starts is stopped (with its script) at the end."""
    started: list[AgentProcess] = []
    yield started
    for a in started:
        a.stop()


def make_config(cp: Plane, box: Path, run_id: str, script: str, **kw: Any) -> AgentConfig:
    attempt = kw.pop("attempt", 1)
    return AgentConfig(
        run_id=run_id,
        attempt=attempt,
        box_id=kw.pop("box_id", f"box-{run_id}"),
        workdir=str(box / "attempts" / str(attempt)),
        nats_url=cp.nats.url,
        subject_prefix=cp.subjects.prefix,
        script=script,
        heartbeat_s=kw.pop("heartbeat_s", 0.5),
        envs_dir=str(box / "envs"),
        python=kw.pop("python", sys.executable),  # the box's base interpreter (with torch)
        **kw,
    )


async def run_events(cp: Plane, run_id: str) -> list[Envelope]:
    return await cp.read_stream(cp.subjects.run_events(run_id))


async def ended(cp: Plane, run_id: str, attempt: int = 1, timeout: float = 60.0) -> Envelope:
    async def find() -> Envelope | None:
        for env in await run_events(cp, run_id):
            if env.type == "attempt.ended" and env.data.get("attempt") == attempt:
                return env
        return None

    found: Envelope = await eventually(find, timeout=timeout, what=f"AttemptEnded of attempt {attempt}")
    return found


def wait_file(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear in {timeout:g}s")
        time.sleep(0.02)


@pytest.fixture
async def fresh_plane(
    nats_server_fresh: NatsServer, s3_server: WeedServer, store: S3Store, subjects: Subjects, sqlite_url: str
) -> AsyncIterator[Plane]:
    """A control plane on a nats-server of the test's own, free to stop and start again on its port."""
    b = await Bus.connect(nats_server_fresh.url, name="test", subjects=subjects, reconnect="forever")
    await b.ensure_streams()
    service = SyncerService(syncer_settings(nats_server_fresh, s3_server, store, subjects, sqlite_url))
    try:
        async with running(service):
            yield Plane(nats_server_fresh, s3_server, store, subjects, b, service)
    finally:
        await b.close()


@dataclass
class AuthPlane:
    plane: Plane
    auth: NatsAuth
    dir: Path

    def box_creds(self, run_id: str, box_id: str) -> str:
        path = self.dir / f"{box_id}.creds"
        path.write_text(self.auth.box_creds(self.plane.subjects.prefix, run_id, box_id, ttl_s=600))
        path.chmod(0o600)
        return str(path)


@pytest.fixture
async def auth_plane(
    tmp_path: Path, s3_server: WeedServer, store: S3Store, subjects: Subjects, sqlite_url: str
) -> AsyncIterator[AuthPlane]:
    """The control plane with NATS in operator/JWT mode (as ``choline up`` runs it): services hold
    service credentials, each box gets its own run's subjects only."""
    auth = NatsAuth.load_or_create(tmp_path / "secrets")
    conf = tmp_path / "nats-auth.conf"
    conf.write_text(auth.server_config())
    server = NatsServer(tmp_path / "nats-auth", config_file=conf)
    server.start()
    creds = tmp_path / "services.creds"
    creds.write_text(auth.service_creds())
    b = await Bus.connect(server.url, name="test", subjects=subjects, creds=str(creds), reconnect="fail-fast")
    await b.ensure_streams()
    settings = syncer_settings(server, s3_server, store, subjects, sqlite_url)
    settings.nats_creds = creds
    service = SyncerService(settings)
    try:
        async with running(service):
            yield AuthPlane(Plane(server, s3_server, store, subjects, b, service), auth, tmp_path)
    finally:
        await b.close()
        server.stop()
