"""Fixtures for the provisioner: the real service as a subprocess (so tests can crash it at a
fault barrier and restart it), on the session's NATS and S3, with this test's CHOLINE_HOME and
subject prefix, and a client bus to talk to it.

- ``prov``     a ``ProvisionerProc``: ``start(faults=...)``, ``kill()``, ``wait_exit()``;
               stopped at teardown, every local box it made removed
- ``client``   a bus on the same prefix, with helpers to request runs and read them back
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from choline_core.bus import Bus
from choline_core.embedded import NatsServer, WeedServer
from choline_core.events import ControlAction, ControlCommand, RunRequested, RunSpec, RunState
from choline_core.pipeline import code_key
from choline_core.rpc import RunInfo, RunQuery, raise_for_error
from choline_core.storage import S3Store
from choline_core.subjects import Subjects
from choline_provisioner.providers import localbox


class ServiceProc:
    """A control-plane service as a real process (``python -m choline_<name>``)."""

    def __init__(self, name: str, home: Path, env: dict[str, str]) -> None:
        self.name = name
        self.home = home
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home / f"{name}.log"

    def start(self, faults: str = "", **extra: str) -> None:
        env = dict(self.env, CHOLINE_FAULTS=faults, CHOLINE_FAULTS_DIR=str(self.home / "faults"), **extra)
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"choline_{self.name}", "--health-port", "0"],
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
def prov_env(choline_home: Path, nats_server: NatsServer, s3_server: WeedServer, subjects: Subjects) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHOLINE_")}
    env.update(
        CHOLINE_HOME=str(choline_home),
        CHOLINE_NATS_URL=nats_server.url,
        CHOLINE_S3_ENDPOINT=s3_server.endpoint,
        CHOLINE_S3_ACCESS_KEY=s3_server.access_key,
        CHOLINE_S3_SECRET_KEY=s3_server.secret_key,
        CHOLINE_S3_BUCKET=f"t-{uuid.uuid4().hex[:10]}",
        CHOLINE_SUBJECT_PREFIX=subjects.prefix,
        CHOLINE_INSTALLATION_ID=f"inst-{uuid.uuid4().hex[:8]}",
        CHOLINE_LOSS_TIMEOUT_S="3",
        CHOLINE_PROBE_TIMEOUT_S="3",
        CHOLINE_REAPER_INTERVAL_S="1",
        CHOLINE_WATCH_INTERVAL_S="0.2",
        CHOLINE_HEARTBEAT_S="0.5",
        CHOLINE_LEASE_S="4",
        PYTHONUNBUFFERED="1",
        CHOLINE_LOG_LEVEL=os.environ.get("TEST_PROV_LOG_LEVEL", "INFO"),
    )
    return env


ProvisionerProc = ServiceProc


@pytest.fixture
def syncer(choline_home: Path, prov_env: dict[str, str]) -> Iterator[ServiceProc]:
    """The real syncer (boxes get their presigned URLs from it)."""
    p = ServiceProc("syncer", choline_home, prov_env)
    p.start()
    yield p
    p.stop()


@pytest.fixture
def prov(choline_home: Path, prov_env: dict[str, str], syncer: ServiceProc) -> Iterator[ServiceProc]:
    p = ServiceProc("provisioner", choline_home, prov_env)
    yield p
    p.stop()
    boxes = choline_home / "boxes"
    if boxes.is_dir():
        for d in boxes.iterdir():
            with contextlib.suppress(Exception):
                localbox.remove_box(d)


SLEEPER = (
    "import time, sys\nprint('sleeping', flush=True)\ntime.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 600)\n"
)


@dataclass
class Client:
    bus: Bus
    subjects: Subjects
    store: S3Store

    def upload_code(self, files: dict[str, str]) -> str:
        """Put a code bundle of ``files`` where boxes fetch code; returns its digest."""
        import tempfile

        from choline.packaging import pack_code

        with tempfile.TemporaryDirectory() as d:
            for rel, text in files.items():
                (Path(d) / rel).parent.mkdir(parents=True, exist_ok=True)
                (Path(d) / rel).write_text(text)
            bundle = pack_code(Path(d))
        self.store.put_bytes(code_key(bundle.digest), bundle.data)
        return bundle.digest

    async def request_run(self, run_id: str | None = None, **spec: Any) -> str:
        run_id = run_id or f"r{uuid.uuid4().hex[:10]}"
        if "code_digest" not in spec:
            spec["code_digest"] = self.upload_code({"train.py": SLEEPER})
        spec.setdefault("script", "train.py")
        spec.setdefault("gpus", "1xcpu")
        await self.bus.publish(
            self.subjects.provision("requests"), RunRequested(run_id=run_id, owner="tester", spec=RunSpec(**spec))
        )
        return run_id

    async def control(self, run_id: str, action: ControlAction, **params: Any) -> None:
        await self.bus.publish(
            self.subjects.run_control(run_id), ControlCommand(run_id=run_id, action=action, params=params)
        )

    async def get(self, run_id: str) -> RunInfo | None:
        try:
            env = await self.bus.request(
                self.subjects.rpc("provisioner", "get_run"), RunQuery(run_id=run_id), timeout=5
            )
        except Exception:
            return None
        if env.type == "error":
            return None
        return raise_for_error(env).event(RunInfo)

    async def wait_state(self, run_id: str, *states: RunState, timeout: float = 60.0) -> RunInfo:
        deadline = time.monotonic() + timeout
        info = None
        while time.monotonic() < deadline:
            info = await self.get(run_id)
            if info is not None and info.state in states:
                return info
            await asyncio.sleep(0.2)
        raise AssertionError(
            f"run {run_id} never reached {[s.value for s in states]}; last: "
            f"{info.state.value if info else None} ({info.reason if info else ''})"
        )


@pytest.fixture
async def client(
    nats_server: NatsServer, s3_server: WeedServer, subjects: Subjects, prov_env: dict[str, str]
) -> AsyncIterator[Client]:
    bus = await Bus.connect(nats_server.url, name="test-client", subjects=subjects, reconnect="fail-fast")
    await bus.ensure_streams()
    store = S3Store(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, prov_env["CHOLINE_S3_BUCKET"])
    store.ensure_bucket()
    yield Client(bus, subjects, store)
    store.delete_prefix("")
    await bus.delete_streams()
    await bus.close()


def live_boxes(home: Path) -> list[Path]:
    """Local box folders whose SSH server still runs."""
    boxes = home / "boxes"
    if not boxes.is_dir():
        return []
    return [d for d in boxes.iterdir() if localbox.box_state(d) in ("running", "loading")]
