"""The embedded control plane's supervisor: ``python -m choline_svc.supervisor``.

Started by ``choline up`` (detached) or ``choline up --foreground`` (attached). It holds
``run/supervisor.lock`` for its whole life (a second supervisor refuses to start), starts
NATS, then the S3 server, then every service as its own process, restarts any that exits
with exponential backoff (logged), writes ``run/state.json`` once a second, and on SIGTERM
stops the services first (they drain their NATS connections), then S3, then NATS.

Children die with the supervisor (PR_SET_PDEATHSIG), so even a SIGKILLed supervisor leaves
no orphans.

Services are forked, not spawned (Linux, when the supervisor has no other thread): the supervisor
imports the stack the services share (SQLAlchemy, nats, pydantic, FastAPI, uvicorn, choline's
own libraries) once, while NATS starts, and each service starts from a fork of it and runs its
``python -m choline_<name>`` module there. Five services no longer import the same 0.6 s of
modules each on two cores, and those pages stay shared between them (copy-on-write).
``CHOLINE_SUPERVISOR_FORK=0`` spawns a fresh interpreter per service instead.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import importlib
import json
import logging
import os
import random
import runpy
import signal
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from abc import ABC, abstractmethod
from pathlib import Path
from typing import IO, Any

from choline_core.controlplane import LOCK_FILE, SERVICES, STATE_FILE, ControlPlaneConfig
from choline_core.embedded import NatsServer, WeedServer, die_with_parent, spawn
from choline_core.errors import CholineError
from choline_core.logs import configure_logging
from choline_core.natsauth import NatsAuth
from choline_core.settings import SECRETS_DIR, choline_home, write_private

log = logging.getLogger("choline.supervisor")

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # a component up this long has its backoff reset


# What every service imports: loaded once in the supervisor, shared by the forked services. Only
# libraries that read no per-service setting at import time.
PRELOAD = (
    "sqlalchemy",
    "sqlalchemy.orm",
    "sqlmodel",
    "alembic.command",
    "alembic.runtime.migration",
    "nats",
    "nats.js",
    "aiohttp",
    "pydantic",
    "pydantic_settings",
    "httpx",
    "fastapi",
    "starlette.applications",
    "uvicorn",
    "choline_core.events",
    "choline_core.bus",
    "choline_core.storage",
    "choline_svc.db",
    "choline_svc.service",
)


def fork_enabled() -> bool:
    return (
        hasattr(os, "fork")
        and sys.platform.startswith("linux")
        and os.environ.get("CHOLINE_SUPERVISOR_FORK", "1").strip().lower() not in ("0", "false", "no", "off")
    )


def preload() -> float:
    """Import ``PRELOAD`` (seconds it took); a module that fails to import is left to the service."""
    t0 = time.monotonic()
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as exc:  # the service will import it again and say what is wrong
            log.debug("preload of %s failed: %s", name, exc)
    return time.monotonic() - t0


class ForkedProcess:
    """The part of ``subprocess.Popen`` the supervisor uses, for a service forked from it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1
                return self.returncode
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode


def fork_module(module: str, args: list[str], *, env: dict[str, str], cwd: Path, log_fd: int) -> ForkedProcess:
    """Run ``python -m module args`` in a fork of this process: its own session, output to ``log_fd``,
    exactly ``env`` as its environment, SIGTERM when the supervisor dies."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()  # nothing buffered here is written twice
    pid = os.fork()
    if pid:
        return ForkedProcess(pid)
    code = 1
    try:
        os.setsid()
        die_with_parent()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        atexit._clear()  # the supervisor's exit handlers are not this process's
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        for fd in [int(n) for n in os.listdir("/proc/self/fd") if int(n) > 2]:
            with contextlib.suppress(OSError):
                os.close(fd)  # the supervisor's lock, logs and sockets stay the supervisor's
        # fresh stream objects (an inherited one may hold a lock another thread took) writing to the log
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = sys.__stdout__ = open(1, "w", buffering=1, closefd=False)  # type: ignore[misc]  # noqa: SIM115
        sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, closefd=False)  # type: ignore[misc]  # noqa: SIM115
        os.chdir(cwd)
        _set_title(f"{sys.executable} -m {module} {' '.join(args)}")  # before environ changes: it moves environ
        os.environ.clear()
        os.environ.update(env)
        random.seed()  # not the supervisor's sequence
        logging.getLogger().handlers.clear()
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int) and exc.code is not None:
            with contextlib.suppress(Exception):
                sys.stderr.write(f"{exc.code}\n")
    except BaseException:
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _set_title(title: str) -> None:
    """What ps and top show for a forked service: the command a spawned one would have."""
    try:
        from setproctitle import setproctitle
    except ImportError:  # pragma: no cover - then ps shows the supervisor's command line
        return
    setproctitle(title)


class Component(ABC):
    """One supervised process: how to launch it, whether it lives, whether it answers."""

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.port = port
        self.restarts = 0
        self.backoff = BACKOFF_START
        self.restart_at: float | None = None
        self.started_at = 0.0
        self.healthy = False
        self.last_exit: int | None = None

    @abstractmethod
    def launch(self) -> None: ...

    @abstractmethod
    def alive(self) -> bool: ...

    @abstractmethod
    def pid(self) -> int | None: ...

    @abstractmethod
    def check(self) -> bool: ...

    @abstractmethod
    def stop(self, timeout: float) -> None: ...

    @abstractmethod
    def exit_code(self) -> int | None: ...

    def state(self) -> dict[str, Any]:
        return {
            "pid": self.pid(),
            "port": self.port,
            "healthy": self.healthy,
            "restarts": self.restarts,
            "since": self.started_at,
            "last_exit": self.last_exit,
        }


class NatsComponent(Component):
    """nats-server in operator/JWT mode: services use the service credentials, each box its own."""

    def __init__(self, cfg: ControlPlaneConfig) -> None:
        super().__init__("nats", cfg.ports["nats"])
        conf = cfg.path("nats", "auth.conf")
        conf.parent.mkdir(parents=True, exist_ok=True)
        write_private(conf, NatsAuth.load_or_create(cfg.path(SECRETS_DIR)).server_config())
        self.server = NatsServer(
            cfg.path("nats"),
            cfg.ports["nats"],
            cfg.ports["nats_monitor"],
            config_file=conf,
            log_path=cfg.path("logs", "nats.log"),
        )
        self.server.die_with_parent = True

    def launch(self) -> None:
        self.server.start()

    def alive(self) -> bool:
        return self.server.running()

    def pid(self) -> int | None:
        return self.server.pid

    def check(self) -> bool:
        return self.server.healthy()

    def exit_code(self) -> int | None:
        return self.server.proc.returncode if self.server.proc else None

    def stop(self, timeout: float) -> None:
        self.server.stop(timeout)


class S3Component(Component):
    def __init__(self, cfg: ControlPlaneConfig) -> None:
        super().__init__("s3", cfg.s3_ports["s3"])
        creds = cfg.ensure_credentials()
        self.server = WeedServer(
            cfg.path("s3"),
            creds["s3_access_key"],
            creds["s3_secret_key"],
            ports=cfg.s3_ports,
            log_path=cfg.path("logs", "s3.log"),
        )
        self.server.die_with_parent = True
        self.bucket = cfg.bucket
        self.bucket_ready = False

    def launch(self) -> None:
        # Spawn only: the supervisor's loop sees it healthy, and services do not wait for S3.
        self.server._spawn()
        self.bucket_ready = False

    def check(self) -> bool:
        if not self.server.healthy():
            return False
        if not self.bucket_ready:
            from choline_core.storage import S3Store

            try:
                S3Store(
                    self.server.endpoint, self.server.access_key, self.server.secret_key, self.bucket
                ).ensure_bucket()
            except CholineError as exc:
                log.warning("bucket %s not ready: %s", self.bucket, exc.one_line())
                return False
            self.bucket_ready = True
        return True

    def alive(self) -> bool:
        return self.server.running()

    def pid(self) -> int | None:
        return self.server.pid

    def exit_code(self) -> int | None:
        return self.server.proc.returncode if self.server.proc else None

    def stop(self, timeout: float) -> None:
        self.server.stop(timeout)


class ServiceComponent(Component):
    #: set by the supervisor once PRELOAD is imported: services start as forks of it
    fork = False

    def __init__(self, cfg: ControlPlaneConfig, service: str) -> None:
        super().__init__(service, cfg.ports[service])
        self.cfg = cfg
        self.proc: subprocess.Popen[bytes] | ForkedProcess | None = None
        self._log: IO[bytes] | None = None

    def launch(self) -> None:
        env = dict(os.environ)
        env.update(
            CHOLINE_HOME=str(self.cfg.home),
            CHOLINE_NATS_URL=self.cfg.nats_url,
            CHOLINE_S3_ENDPOINT=self.cfg.s3_endpoint,
            CHOLINE_S3_BUCKET=self.cfg.bucket,
            CHOLINE_GATEWAY_URL=self.cfg.gateway_url,
            PYTHONUNBUFFERED="1",
        )
        if self._log is None:
            path = self.cfg.path("logs", f"{self.name}.log")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(path, "ab")  # noqa: SIM115 - closed in stop()
        args = ["--health-port", str(self.port)]
        if self.fork and threading.active_count() == 1:  # never fork beside another thread (its locks)
            self.proc = fork_module(f"choline_{self.name}", args, env=env, cwd=self.cfg.home, log_fd=self._log.fileno())
            return
        self.proc = spawn(
            [sys.executable, "-m", f"choline_{self.name}", *args],
            log=self._log,
            env=env,
            cwd=self.cfg.home,
            die_with_parent=True,
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def exit_code(self) -> int | None:
        return self.proc.returncode if self.proc else None

    def check(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop(self, timeout: float) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)

    def wait_stopped(self, deadline: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time; killing it", self.name)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        if self._log:
            self._log.close()
            self._log = None


class Supervisor:
    def __init__(self, home: Path, *, foreground: bool = False) -> None:
        self.home = home
        self.foreground = foreground
        self.stop_event = threading.Event()
        self.started_at = time.time()
        self.status = "starting"
        self._lock_fd: int | None = None
        self.cfg: ControlPlaneConfig | None = None
        self.components: list[Component] = []

    # ------------------------------------------------------------------ lock
    def acquire_lock(self) -> None:
        path = self.home / LOCK_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            other = path.read_text().strip() or "?"
            raise CholineError(
                f"choline is already up (supervisor pid {other})", hint="see 'choline status', or 'choline down' first"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    # ------------------------------------------------------------------ state
    def write_state(self) -> None:
        assert self.cfg is not None
        state = {
            "status": self.status,
            "supervisor": {"pid": os.getpid(), "since": self.started_at},
            "gateway_url": self.cfg.gateway_url,
            "nats_url": self.cfg.nats_url,
            "s3_endpoint": self.cfg.s3_endpoint,
            "components": {c.name: c.state() for c in self.components},
            "updated": time.time(),
        }
        path = self.home / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, path)

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        self.acquire_lock()
        self.cfg = cfg = ControlPlaneConfig.load_or_create(self.home)
        cfg.check_ports_free()
        self.components = [NatsComponent(cfg), S3Component(cfg), *(ServiceComponent(cfg, s) for s in SERVICES)]
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())
        self.write_state()
        try:
            # NATS first and waited for (services connect to it at start); S3 and the services then
            # start side by side, and the loop below reports when all of them answer.
            servers, services = self.components[:2], self.components[2:]
            for comp in servers:
                self._start(comp)
            if fork_enabled() and threading.active_count() == 1:
                took = preload()  # while NATS and S3 start
                ServiceComponent.fork = True
                log.info("services start as forks of the supervisor (shared imports: %.2fs)", took)
            for comp in services:
                self._start(comp)
            self._loop()
        finally:
            self.status = "stopping"
            with contextlib.suppress(Exception):
                self.write_state()
            self._shutdown()
            self.status = "stopped"
            with contextlib.suppress(Exception):
                self.write_state()
        return 0

    def _start(self, comp: Component) -> None:
        comp.started_at = time.time()
        comp.healthy = False
        comp.launch()
        log.info("started %s (pid %s, port %s)", comp.name, comp.pid(), comp.port)

    def _loop(self) -> None:
        next_check = 0.0
        while not self.stop_event.is_set():
            now = time.monotonic()
            for comp in self.components:
                if comp.restart_at is not None:
                    if now >= comp.restart_at:
                        comp.restart_at = None
                        comp.restarts += 1
                        log.warning("restarting %s (restart #%d)", comp.name, comp.restarts)
                        try:
                            self._start(comp)
                        except CholineError as exc:
                            log.error("restart of %s failed: %s", comp.name, exc.one_line())
                            self._schedule_restart(comp, now)
                elif not comp.alive():
                    comp.last_exit = comp.exit_code()
                    comp.healthy = False
                    if time.time() - comp.started_at > STABLE_AFTER:
                        comp.backoff = BACKOFF_START
                    log.warning("%s exited (code %s); restarting in %.1fs", comp.name, comp.last_exit, comp.backoff)
                    self._schedule_restart(comp, now)
            if now >= next_check:
                for comp in self.components:
                    comp.healthy = comp.restart_at is None and comp.alive() and comp.check()
                if self.status == "starting" and all(c.healthy for c in self.components):
                    self.status = "up"
                    log.info("all components healthy after %.2fs", time.time() - self.started_at)
                self.write_state()
                next_check = now + (0.1 if self.status == "starting" else 1.0)
            self.stop_event.wait(0.05 if self.status == "starting" else 0.2)

    def _schedule_restart(self, comp: Component, now: float) -> None:
        comp.restart_at = now + comp.backoff
        comp.backoff = min(comp.backoff * 2, BACKOFF_MAX)

    def _shutdown(self) -> None:
        log.info("stopping services")
        services = [c for c in self.components if isinstance(c, ServiceComponent)]
        for svc in services:
            svc.stop(0)
        deadline = time.monotonic() + 20
        for svc in services:
            svc.wait_stopped(deadline)
        for comp in reversed(self.components[:2]):  # S3, then NATS
            log.info("stopping %s", comp.name)
            comp.stop(10)
        log.info("stopped")


def _tail_logs(home: Path, names: list[str], stop: threading.Event) -> None:
    """Foreground mode: print every component's log lines with its name as prefix."""
    handles: dict[str, Any] = {}
    width = max(len(n) for n in names)
    while not stop.is_set():
        for name in names:
            path = home / "logs" / f"{name}.log"
            if name not in handles:
                if not path.exists():
                    continue
                fh = open(path, errors="replace")  # noqa: SIM115 - kept open while tailing
                fh.seek(0, os.SEEK_END)
                handles[name] = fh
            for line in handles[name].readlines():
                sys.stdout.write(f"{name:<{width}} | {line}")
        sys.stdout.flush()
        stop.wait(0.2)
    for fh in handles.values():
        fh.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m choline_svc.supervisor")
    parser.add_argument("--foreground", action="store_true", help="show every component's log with a prefix")
    args = parser.parse_args(argv)
    home = choline_home()
    home.mkdir(parents=True, exist_ok=True)
    configure_logging("INFO", os.environ.get("CHOLINE_LOG_FORMAT", "human"), service="supervisor")
    sup = Supervisor(home, foreground=args.foreground)
    tailer_stop = threading.Event()
    if args.foreground:
        names = ["nats", "s3", *SERVICES]
        threading.Thread(target=_tail_logs, args=(home, names, tailer_stop), daemon=True).start()
    try:
        return sup.run()
    except CholineError as exc:
        sys.stderr.write(f"choline: error: {exc.one_line()}\n")
        return 1
    finally:
        tailer_stop.set()


if __name__ == "__main__":
    sys.exit(main())
