"""Bootstrap a box over SSH and keep its tunnels open.

``BoxSession`` holds the provisioner's SSH connection to one box. In tunnelled mode (the
embedded default) it opens remote port forwards so the agent reaches NATS and S3 on the box's
own loopback, and re-opens them on the same box-side ports when the connection drops (a Wi-Fi
blip on the laptop drops tunnels, not boxes: the agent buffers meanwhile). In direct mode the
agent gets the public URLs and no tunnel is opened.

``start_agent`` is idempotent: it writes the agent's config (0600) and starts
``python -m choline_agent run`` detached, unless an agent of this attempt already runs (a
provisioner restarted mid-bootstrap must not start a second one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from choline_agent import AGENT_VERSION
from choline_core.errors import ProvisioningFailed
from choline_core.faults import abarrier
from choline_core.pipeline import AgentConfig

from .providers.base import SshEndpoint
from .sshclient import Forward, KeyPair, SshConnection, SshError, connect_retrying

log = logging.getLogger(__name__)


@dataclass
class Tunnels:
    nats_port: int
    s3_port: int


class BoxSession:
    """One SSH connection to a box, with its tunnels; ``keep()`` re-opens both when they drop."""

    def __init__(
        self,
        box_id: str,
        endpoint: SshEndpoint,
        key: KeyPair,
        *,
        nats_dest: tuple[str, int] | None,
        s3_dest: tuple[str, int] | None,
        connect_timeout: float = 60.0,
    ) -> None:
        self.box_id = box_id
        self.endpoint = endpoint
        self.key = key
        self.nats_dest = nats_dest
        self.s3_dest = s3_dest
        self.connect_timeout = connect_timeout
        self.conn: SshConnection | None = None
        self.forwards: list[Forward] = []
        self.tunnels: Tunnels | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._closing = False
        self.reconnects = 0

    async def open(self, *, nats_port: int | None = None, s3_port: int | None = None) -> SshConnection:
        """Connect (retrying while the box boots) and open the tunnels on the given box-side ports."""
        self.conn = await connect_retrying(self.endpoint, self.key, timeout=self.connect_timeout)
        if self.nats_dest and self.s3_dest:
            await self._open_tunnels(nats_port or 0, s3_port or 0)
        return self.conn

    async def _open_tunnels(self, nats_port: int, s3_port: int) -> None:
        assert self.conn is not None and self.nats_dest and self.s3_dest
        fn = await self.conn.forward_remote(*self.nats_dest, listen_port=nats_port)
        fs = await self.conn.forward_remote(*self.s3_dest, listen_port=s3_port)
        self.forwards = [fn, fs]
        self.tunnels = Tunnels(fn.listen_port, fs.listen_port)

    def keep(self) -> None:
        """Watch the connection in the background and re-open it (and the tunnels) when it drops."""
        if self._keeper is None:
            self._keeper = asyncio.create_task(self._keep(), name=f"tunnels:{self.box_id}")

    async def _keep(self) -> None:
        while not self._closing:
            if self.conn is not None:
                await self.conn.wait_closed()
            if self._closing:
                return
            log.warning("ssh connection to box %s dropped; reconnecting", self.box_id)
            await abarrier("provision.tunnel_reconnect")
            delay = 0.5
            while not self._closing:
                try:
                    ports = self.tunnels
                    self.conn = await connect_retrying(self.endpoint, self.key, timeout=30)
                    if self.nats_dest and self.s3_dest:
                        await self._open_tunnels(ports.nats_port if ports else 0, ports.s3_port if ports else 0)
                    self.reconnects += 1
                    log.info("box %s: ssh and tunnels back (reconnect #%d)", self.box_id, self.reconnects)
                    break
                except SshError as exc:
                    log.debug("box %s: reconnect failed: %s", self.box_id, exc.one_line())
                    if self.conn is not None:
                        await self.conn.close()
                        self.conn = None
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)

    async def drop(self) -> None:
        """Close the connection (and its tunnels) without giving up the box: the keeper reconnects."""
        if self.conn is not None:
            await self.conn.close()

    async def close(self) -> None:
        self._closing = True
        if self._keeper:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._keeper
        for fwd in self.forwards:
            with contextlib.suppress(Exception):
                fwd.close()
        if self.conn is not None:
            await self.conn.close()


async def box_python(conn: SshConnection) -> str:
    """The interpreter to run the agent with: the box's own environment when it has one (a
    local box layered on the shared base), else the image's ``python3``."""
    res = await conn.run(
        'if [ -x .venv/bin/python ]; then echo "$(pwd)/.venv/bin/python"; '
        "else command -v python3 || command -v python; fi",
        timeout=30,
    )
    path = res.stdout.strip().splitlines()[-1] if res.ok and res.stdout.strip() else ""
    if not path:
        raise ProvisioningFailed("the box has no python3", hint="use an image that ships Python 3.10 or newer")
    return path


async def prepare_box(conn: SshConnection, run_id: str, attempt: int) -> tuple[str, str]:
    """One round trip: the interpreter to run the agent with (see ``box_python``) and the
    attempt's working folder, created."""
    res = await conn.run(
        'if [ -x .venv/bin/python ]; then echo "$(pwd)/.venv/bin/python"; '
        "else command -v python3 || command -v python || echo; fi; "
        f"mkdir -p choline/{run_id}/{attempt} && cd choline/{run_id}/{attempt} && pwd",
        timeout=30,
    )
    lines = [line.strip() for line in res.stdout.splitlines()]
    if not res.ok or len(lines) < 2:
        raise ProvisioningFailed(f"cannot prepare the box: {(res.stderr or res.stdout).strip()[-300:]}")
    python, workdir = lines[-2], lines[-1]
    if not python:
        raise ProvisioningFailed("the box has no python3", hint="use an image that ships Python 3.10 or newer")
    return python, workdir


async def agent_version(conn: SshConnection, python: str) -> str | None:
    res = await conn.run(
        f"{shlex.quote(python)} -c 'import choline_agent; print(choline_agent.AGENT_VERSION)'", timeout=60
    )
    return res.stdout.strip() if res.ok else None


def agent_wheels(home: Path) -> list[Path]:
    """Wheels of choline-core, the training library (``choline``) and the agent at this version,
    built once under CHOLINE_HOME. Their own dependencies come from the box's package index."""
    out = home / "agent-dist" / AGENT_VERSION
    wheels = sorted(out.glob("*.whl"))
    if len(wheels) >= 3:
        return wheels
    out.mkdir(parents=True, exist_ok=True)
    import choline
    import choline_agent
    import choline_core

    sources = [Path(m.__file__ or "").resolve().parents[2] for m in (choline_core, choline, choline_agent)]
    for src in sources:
        if not (src / "pyproject.toml").exists():
            raise ProvisioningFailed(f"cannot build the agent wheel: no source tree at {src}")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), *map(str, sources)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return sorted(out.glob("*.whl"))


async def ensure_agent(conn: SshConnection, python: str, home: Path) -> None:
    """Install the agent of this version on the box unless it is already there."""
    have = await agent_version(conn, python)
    if have == AGENT_VERSION:
        return
    log.info("installing agent %s on %s (found %s)", AGENT_VERSION, conn.endpoint.pin_name, have or "none")
    wheels = await asyncio.to_thread(agent_wheels, home)
    for whl in wheels:
        await conn.upload(whl, f"choline/dist/{whl.name}")
    names = " ".join(shlex.quote(f"choline/dist/{w.name}") for w in wheels)
    res = await conn.run(
        f"{shlex.quote(python)} -m pip install --quiet --disable-pip-version-check {names}", timeout=600
    )
    if not res.ok:
        tail = (res.stderr or res.stdout).strip()[-600:]
        raise ProvisioningFailed(f"installing the agent on the box failed: {tail}")
    if await agent_version(conn, python) != AGENT_VERSION:
        raise ProvisioningFailed("the agent does not import on the box after installing it")


async def running_agent(conn: SshConnection, workdir: str) -> int | None:
    """The pid of this attempt's agent when one runs on the box."""
    q = shlex.quote(workdir)
    res = await conn.run(f"p=$(cat {q}/agent.pid 2>/dev/null) && kill -0 $p 2>/dev/null && echo $p", timeout=30)
    text = res.stdout.strip()
    return int(text) if res.ok and text.isdigit() else None


async def start_agent(conn: SshConnection, python: str, config: AgentConfig, *, faults: str | None = None) -> int:
    """Write the config (0600) and start the agent detached; returns its pid (existing or new)."""
    workdir = config.workdir
    q = shlex.quote(workdir)
    # one round trip: an agent of this attempt that already runs is left alone, else the config is written
    res = await conn.run(
        f"p=$(cat {q}/agent.pid 2>/dev/null) && kill -0 $p 2>/dev/null && echo running $p && exit 0; "
        f"umask 077 && cat > {q}/agent.json && echo written",
        input=config.model_dump_json(),
        timeout=30,
        check=True,
    )
    words = res.stdout.split()
    if words[:1] == ["running"]:
        pid = int(words[1])
        log.info("agent of %s attempt %d already runs on the box (pid %d)", config.run_id, config.attempt, pid)
        return pid
    await abarrier("provision.mid_bootstrap")
    return await launch_agent(conn, python, workdir, faults=faults)


async def launch_agent(conn: SshConnection, python: str, workdir: str, *, faults: str | None = None) -> int:
    """Start the agent detached with the config already in ``workdir``; returns its pid.

    ``cd || exit; nohup ... &`` and not ``cd && nohup ... &``: bash backgrounds a whole ``&&``
    list as a subshell that keeps the SSH channel open and whose pid is not the agent's.
    ``faults``: fault barriers for the agent (chaos tests; see ``choline_core.faults``)."""
    q = shlex.quote(workdir)
    prefix = f"CHOLINE_FAULTS={shlex.quote(faults)} CHOLINE_FAULTS_DIR={q}/faults " if faults else ""
    cmd = (
        f"cd {q} || exit 97; {prefix}nohup {shlex.quote(python)} -m choline_agent run --config {q}/agent.json "
        f">> {q}/agent.log 2>&1 < /dev/null & echo $! > {q}/agent.pid; cat {q}/agent.pid"
    )
    res = await conn.run(cmd, timeout=30, check=True)
    return int(res.stdout.strip().splitlines()[-1])


async def probe(endpoint: SshEndpoint, key: KeyPair, timeout: float) -> bool:
    """A fresh, direct SSH connection that runs ``true``: is the machine itself alive?"""
    try:
        conn = await asyncio.wait_for(SshConnection.open(endpoint, key, connect_timeout=timeout), timeout + 5)
    except (SshError, asyncio.TimeoutError):
        return False
    try:
        res = await conn.run("true", timeout=timeout)
        return res.ok
    except SshError:
        return False
    finally:
        await conn.close()


def config_json(config: AgentConfig) -> str:
    return json.dumps(config.model_dump(mode="json"))
