"""The embedded control plane: up, status, restarts, down, up again with state intact."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from choline_core.bus import Bus
from choline_core.controlplane import SERVICES
from choline_core.events import Envelope, RunState, RunStateChanged
from choline_core.settings import CholineSettings
from choline_core.storage import S3Store
from choline_core.subjects import Subjects

pytestmark = pytest.mark.slow


def cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "choline.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
    )


def status() -> dict[str, Any]:
    out = cli("status", "--json")
    return dict(json.loads(out.stdout))


def wait_for(cond: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie lingers where PID 1 does not reap)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


async def publish_and_put(marker: str) -> None:
    s = CholineSettings()
    bus = await Bus.connect(
        s.nats_url,
        name="t",
        subjects=Subjects(s.subject_prefix),
        reconnect="fail-fast",
        creds=str(s.nats_creds) if s.nats_creds else None,
    )
    await bus.publish(
        bus.subjects.run_events("r1"), RunStateChanged(run_id="r1", state=RunState.running, reason=marker)
    )
    await bus.close()
    S3Store.from_settings(s).put_bytes("marker.txt", marker.encode())


async def read_back() -> tuple[list[str], bytes]:
    s = CholineSettings()
    bus = await Bus.connect(
        s.nats_url,
        name="t",
        subjects=Subjects(s.subject_prefix),
        reconnect="fail-fast",
        creds=str(s.nats_creds) if s.nats_creds else None,
    )
    got: list[Envelope] = []

    async def handler(env: Envelope) -> None:
        got.append(env)

    await bus.consume("reader", bus.subjects.all_run_events(), handler)
    for _ in range(100):
        if got:
            break
        await asyncio.sleep(0.05)
    await bus.close()
    return [e.event(RunStateChanged).reason or "" for e in got], S3Store.from_settings(s).get_bytes("marker.txt")


def test_up_status_restart_down_up(choline_home: Path) -> None:
    try:
        up = cli("up")
        assert up.returncode == 0, up.stderr
        st = status()
        assert st["healthy"] and set(st["components"]) == {"nats", "s3", *SERVICES}
        ports = {n: c["port"] for n, c in st["components"].items()}

        # every service answers /metrics in the Prometheus format
        for svc in SERVICES:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[svc]}/metrics", timeout=5) as resp:
                body = resp.read().decode()
            assert f'choline_up{{service="{svc}"}} 1.0' in body

        # credentials are private
        assert oct((choline_home / "secrets" / "s3.json").stat().st_mode & 0o777) == "0o600"

        asyncio.run(publish_and_put("before-down"))

        # a crashed service comes back, and the restart is counted and logged
        victim = st["components"]["provisioner"]["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: (c := status()["components"]["provisioner"])["restarts"] >= 1 and c["health"] == "healthy")
        assert "provisioner exited" in (choline_home / "logs" / "supervisor.log").read_text()

        # a second `up` is refused, in one line
        again = cli("up")
        assert again.returncode == 1 and "already up" in again.stderr and again.stderr.count("\n") == 1

        pids = [c["pid"] for c in status()["components"].values()]
        down = cli("down")
        assert down.returncode == 0, down.stderr
        assert cli("status").returncode == 1
        wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=10)

        # up again: same ports, streams and objects intact
        up2 = cli("up")
        assert up2.returncode == 0, up2.stderr
        st2 = status()
        assert {n: c["port"] for n, c in st2["components"].items()} == ports
        reasons, obj = asyncio.run(read_back())
        assert reasons == ["before-down"] and obj == b"before-down"
    finally:
        cli("down")


def test_supervisor_killed_leaves_no_orphans(choline_home: Path) -> None:
    try:
        assert cli("up").returncode == 0
        st = status()
        pids = [c["pid"] for c in st["components"].values()]
        os.kill(st["supervisor_pid"], signal.SIGKILL)
        wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=20)
        # and the next `up` works
        assert cli("up").returncode == 0
        assert status()["healthy"]
    finally:
        cli("down")


def test_taken_port_is_reported_clearly(choline_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        monkeypatch.setenv("CHOLINE_GATEWAY_PORT", str(port))
        out = cli("up")
        assert out.returncode == 1
        assert f"port {port} for api" in out.stderr and "CHOLINE_GATEWAY_PORT" in out.stderr
        assert out.stderr.count("\n") == 1
    assert cli("status").returncode == 1


def test_down_when_not_up_is_harmless(choline_home: Path) -> None:
    out = cli("down")
    assert out.returncode == 0 and "not up" in out.stdout
