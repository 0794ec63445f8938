"""``choline up / status / down``: the embedded control plane on this machine."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from choline_core.errors import CholineError, InfraError

from ..output import emit_json, table


def register(sub: Any) -> None:
    p = sub.add_parser("up", help="start the embedded control plane (NATS, S3, services) on this machine")
    p.add_argument("--foreground", action="store_true", help="stay attached and show every component's log")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for all components (default 60)")
    p.set_defaults(handler=cmd_up)

    p = sub.add_parser("status", help="show the control plane's components and their health")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("down", help="stop the embedded control plane (state is kept for the next 'up')")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a clean stop (default 60)")
    p.set_defaults(handler=cmd_down)


def _home() -> Path:
    from choline_core.settings import choline_home

    home = choline_home()
    home.mkdir(parents=True, exist_ok=True)
    return home


def _require_server_packages() -> None:
    if importlib.util.find_spec("choline_svc") is None:
        raise CholineError(
            "the control plane is not installed in this Python",
            hint="pip install choline-svc and the choline services, or use a remote gateway",
        )


def supervisor_pid(home: Path) -> int | None:
    """The pid holding the supervisor lock, or None when no supervisor runs."""
    from choline_core.controlplane import LOCK_FILE

    path = home / LOCK_FILE
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            return int(path.read_text().strip() or 0) or None
        except ValueError:
            return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def cmd_up(args: argparse.Namespace) -> int:
    from choline_core.controlplane import ControlPlaneConfig, read_state

    _require_server_packages()
    home = _home()
    pid = supervisor_pid(home)
    if pid:
        raise CholineError(
            f"choline is already up (supervisor pid {pid})", hint="see 'choline status', or 'choline down' first"
        )
    cfg = ControlPlaneConfig.load_or_create(home)
    cfg.check_ports_free()
    cmd = [sys.executable, "-m", "choline_svc.supervisor"]
    if args.foreground:
        cmd.append("--foreground")
        proc = subprocess.Popen(cmd)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGTERM)
            return proc.wait()
    (home / "logs").mkdir(exist_ok=True)
    state_path = home / "run" / "state.json"
    with contextlib.suppress(FileNotFoundError):
        state_path.unlink()
    t0 = time.monotonic()
    with open(home / "logs" / "supervisor.log", "ab") as logf:
        proc = subprocess.Popen(
            cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    deadline = t0 + args.timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise InfraError(
                f"the control plane failed to start: {_tail(home / 'logs' / 'supervisor.log')}",
                hint=f"logs are in {home / 'logs'}",
            )
        state = read_state(home)
        if state and state.get("status") == "up" and state.get("supervisor", {}).get("pid") == proc.pid:
            elapsed = time.monotonic() - t0
            print(f"choline is up in {elapsed:.1f}s: gateway {state['gateway_url']}")
            print(f"  logs: {home / 'logs'}   stop: choline down   details: choline status")
            return 0
        time.sleep(0.05)
    unhealthy = [n for n, c in ((read_state(home) or {}).get("components") or {}).items() if not c.get("healthy")]
    raise InfraError(
        f"the control plane did not become healthy in {args.timeout:g}s (waiting for: {', '.join(unhealthy) or '?'})",
        hint=f"see the logs in {home / 'logs'}; 'choline down' stops it",
    )


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(lines[-n:])


def _check(name: str, comp: dict[str, Any], state: dict[str, Any]) -> bool:
    pid = comp.get("pid")
    if not pid or not _pid_alive(pid):
        return False
    port = comp.get("port")
    if name == "nats":
        return comp.get("healthy", False) and _tcp_open(port)
    if name == "s3":
        return comp.get("healthy", False) and _tcp_open(port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tcp_open(port: int | None) -> bool:
    import socket

    if not port:
        return False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def cmd_status(args: argparse.Namespace) -> int:
    from choline_core.controlplane import read_state

    home = _home()
    pid = supervisor_pid(home)
    state = read_state(home) if pid else None
    if not pid or not state:
        if args.json:
            emit_json({"up": False, "healthy": False, "components": {}, "home": str(home)})
        else:
            print("choline is not up (start it with 'choline up')")
        return 1
    rows = []
    for name, comp in state.get("components", {}).items():
        healthy = _check(name, comp, state)
        rows.append(
            {
                "component": name,
                "pid": comp.get("pid"),
                "port": comp.get("port"),
                "health": "healthy" if healthy else "unhealthy",
                "restarts": comp.get("restarts", 0),
                "up_s": round(time.time() - comp["since"], 1) if comp.get("since") else None,
            }
        )
    all_ok = bool(rows) and all(r["health"] == "healthy" for r in rows)
    if args.json:
        emit_json(
            {
                "up": True,
                "healthy": all_ok,
                "supervisor_pid": pid,
                "gateway_url": state.get("gateway_url"),
                "nats_url": state.get("nats_url"),
                "s3_endpoint": state.get("s3_endpoint"),
                "home": str(home),
                "components": {r["component"]: {k: v for k, v in r.items() if k != "component"} for r in rows},
            }
        )
    else:
        print(f"choline is up (supervisor pid {pid}); gateway {state.get('gateway_url')}")
        table(rows, ["component", "pid", "port", "health", "restarts", "up_s"])
    return 0 if all_ok else 1


def cmd_down(args: argparse.Namespace) -> int:
    home = _home()
    pid = supervisor_pid(home)
    if not pid:
        print("choline is not up")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if supervisor_pid(home) is None and not _pid_alive(pid):
            print("choline is down (state kept; 'choline up' brings it back)")
            return 0
        time.sleep(0.05)
    raise InfraError(
        f"the control plane did not stop within {args.timeout:g}s (supervisor pid {pid})",
        hint=f"kill {pid} stops it hard; logs in {home / 'logs'}",
    )
