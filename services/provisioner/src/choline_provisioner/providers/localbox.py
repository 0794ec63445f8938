"""A local box: an asyncssh SSH server on 127.0.0.1 that stands in for a rented machine.

One box is one detached process group (its own session, so it outlives whoever started it)
serving SSH from a folder ``D``:

- shell commands (exit status, stdout, stderr; ``bash -c`` or ``sh -c``) with ``D`` as HOME and
  working folder, SFTP, and TCP port forwards *to and from loopback only*;
- its own host key and an authorised-keys file read afresh at every login (a key added later,
  as vast.ai's "attach key" does, works at once); only ``--user`` may log in;
- a Python environment of its own at ``D/.venv`` layered on a shared, read-only base (by
  default the interpreter choline runs in, which ships torch and the agent's dependencies):
  the venv's site-packages holds one ``.pth`` that adds the base's site-packages, so torch is
  imported from the base and never reinstalled, while ``pip install`` in the box lands in the
  box's own site-packages (pip never uninstalls outside the environment it runs in);
- a clean environment for commands: none of the starter's variables (no cloud keys, no S3
  secrets) reach a box, only PATH/locale plus what the box was given.

Control files live in ``D/.box/``: ``launch.json`` (pid, written by the starter),
``status.json`` (written by the server: ``running`` with its port once it accepts SSH,
``exited`` after a clean stop, ``failed`` when it could not start), ``server.log``.

Run it directly::

    python -m choline_provisioner.providers.localbox --dir D --port 0 \
        --authorized-key K --host-key H [--user U] [--base-python PY] [--env-file F] [--start-command CMD]

or from Python with ``start_box`` (returns at once) and ``wait_box_ready``. ``box_state`` reads
a box's state, ``kill_box`` makes it die as a machine dies (SIGKILL to the whole group, then to
any process that left the group but carries the box's ``CHOLINE_BOX_DIR`` marker),
``stop_box`` stops it cleanly (``exited``), ``remove_box`` kills it and deletes its folder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONTROL = ".box"
MARKER = "CHOLINE_BOX_DIR"
ENV_DIR = ".venv"
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_KEEP_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM")
_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


# --- shared helpers (both sides) -------------------------------------------------------------
def control_dir(box_dir: Path | str) -> Path:
    return Path(box_dir) / CONTROL


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) from /proc, or None when there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[0], int(fields[19])


def process_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, when given, is the same process (start time)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap our own dead child so it does not linger as a zombie
    if Path("/proc").is_dir():
        stat = _proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            return False
        return start_ticks is None or stat[1] == start_ticks
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def descendants(pid: int) -> list[int]:
    """Pids of the processes below ``pid`` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                raw = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            ppid = int(raw[raw.rfind(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def marked_processes(marker: str, value: str) -> list[int]:
    """Pids of this user's processes whose environment holds ``marker=value`` (Linux /proc)."""
    needle = f"{marker}={value}".encode()
    me = os.getpid()
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                env = Path(entry.path, "environ").read_bytes()
            except OSError:
                continue
            if needle in env.split(b"\0"):
                found.append(int(entry.name))
    return found


def generate_host_key(path: Path) -> str:
    """Write a new ed25519 host key (0600) at ``path``; returns its public key line."""
    import asyncssh

    from choline_core.settings import write_private

    key = asyncssh.generate_private_key("ssh-ed25519")
    write_private(path, key.export_private_key("openssh"))
    public = " ".join(key.convert_to_public().export_public_key("openssh").decode().split()[:2])
    path.with_name(path.name + ".pub").write_text(public + "\n")
    return public


def host_public_key(path: Path) -> str:
    """The public line of a host key file (from its ``.pub`` beside it, or derived)."""
    pub = path.with_name(path.name + ".pub")
    if pub.exists():
        return " ".join(pub.read_text().split()[:2])
    import asyncssh

    key = asyncssh.read_private_key(str(path))
    return " ".join(key.convert_to_public().export_public_key("openssh").decode().split()[:2])


def add_authorized_key(box_dir: Path | str, public_key: str) -> None:
    """Allow one more key on a running box (it reads the file at every login)."""
    path = control_dir(box_dir) / "authorized_keys"
    line = " ".join(public_key.split())
    have = path.read_text().splitlines() if path.exists() else []
    if line not in have:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write(line + "\n")
        path.chmod(0o600)


# --- the shared base environment -------------------------------------------------------------
_BASE_INFO_CODE = (
    "import json, sys, sysconfig; p = sysconfig.get_paths(); "
    "print(json.dumps({'base_executable': getattr(sys, '_base_executable', sys.executable), "
    "'purelib': p['purelib'], 'platlib': p['platlib'], 'version': '%d.%d' % sys.version_info[:2]}))"
)
_base_info_cache: dict[str, dict[str, str]] = {}


def base_env_info(base_python: str) -> dict[str, str]:
    """Where the base interpreter's packages live (asked once per interpreter and cached)."""
    key = os.path.abspath(base_python)
    if key not in _base_info_cache:
        if os.path.abspath(sys.executable) == key:
            import sysconfig

            paths = sysconfig.get_paths()
            info = {
                "base_executable": getattr(sys, "_base_executable", sys.executable),
                "purelib": paths["purelib"],
                "platlib": paths["platlib"],
                "version": f"{sys.version_info[0]}.{sys.version_info[1]}",
            }
        else:
            out = subprocess.run([base_python, "-c", _BASE_INFO_CODE], capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                raise RuntimeError(f"base python {base_python} does not run: {out.stderr.strip()[-300:]}")
            info = json.loads(out.stdout.strip().splitlines()[-1])
        _base_info_cache[key] = info
    return _base_info_cache[key]


def ensure_box_env(box_dir: Path, base_python: str) -> Path:
    """Create ``box_dir/.venv`` layered on ``base_python``'s packages (once; quick: no copies).

    The venv is made from the base's own interpreter without pip; its site-packages gets
    ``_choline_base.pth`` running ``site.addsitedir`` on the base's site-packages, so the
    base's own ``.pth`` files (editable installs) work too and the box's packages come first.
    """
    env_dir = box_dir / ENV_DIR
    info = base_env_info(base_python)
    site = env_dir / "lib" / f"python{info['version']}" / "site-packages"
    pth = site / "_choline_base.pth"
    if pth.exists():
        return env_dir
    if info["base_executable"] == getattr(sys, "_base_executable", sys.executable):
        import venv

        venv.EnvBuilder(symlinks=os.name != "nt", with_pip=False, clear=False).create(str(env_dir))
    else:
        subprocess.run([base_python, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    dirs = dict.fromkeys([info["purelib"], info["platlib"]])
    site.mkdir(parents=True, exist_ok=True)
    pth.write_text("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n")
    return env_dir


# --- the server ------------------------------------------------------------------------------
def _server_classes() -> tuple[type, type]:
    import asyncssh

    class BoxServer(asyncssh.SSHServer):
        def __init__(self, box: _Box) -> None:
            self.box = box
            self.conn: asyncssh.SSHServerConnection | None = None

        def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
            self.conn = conn

        def begin_auth(self, username: str) -> bool:
            assert self.conn is not None
            keys = ""
            if username == self.box.user:
                with contextlib.suppress(OSError):
                    keys = self.box.authorized_keys.read_text()
            self.conn.set_authorized_keys(asyncssh.import_authorized_keys(keys))
            return True

        def public_key_auth_supported(self) -> bool:
            return True

        def server_requested(self, listen_host: str, listen_port: int) -> bool:
            return listen_host in LOOPBACK

        def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
            return dest_host in LOOPBACK

    return BoxServer, asyncssh.SFTPServer


@dataclass
class _Box:
    dir: Path
    user: str
    authorized_keys: Path
    env: dict[str, str]
    shell: str


def _command_env(
    box_dir: Path, user: str, shell: str, extra: Mapping[str, str], env_dir: Path | None
) -> dict[str, str]:
    env = {k: os.environ[k] for k in _KEEP_ENV if k in os.environ}
    path = env.get("PATH", _DEFAULT_PATH)
    if env_dir is not None:
        path = f"{env_dir / 'bin'}:{path}"
        env["VIRTUAL_ENV"] = str(env_dir)
    env.update(
        PATH=path,
        HOME=str(box_dir),
        USER=user,
        LOGNAME=user,
        SHELL=shell,
        TMPDIR=str(box_dir / "tmp"),
    )
    env.setdefault("LANG", "C.UTF-8")
    env.update(extra)
    env[MARKER] = str(box_dir)
    return env


async def _pump(src: Any, dst: Any, *, close_dst: bool) -> None:
    try:
        while True:
            chunk = await src.read(65536)
            if not chunk:
                break
            dst.write(chunk)
            await dst.drain()
    except (OSError, ConnectionError, asyncio.IncompleteReadError):
        pass
    except Exception:  # asyncssh channel errors once the client went away
        pass
    finally:
        if close_dst:
            with contextlib.suppress(Exception):
                dst.close()


async def _run_process(box: _Box, process: Any) -> None:
    """One SSH session: run the command (or a shell), pump bytes both ways, report the status."""
    command = process.command
    argv = [box.shell, "-c", command] if command is not None else [box.shell]
    env = {**box.env, **{str(k): str(v) for k, v in (process.env or {}).items()}}
    env[MARKER] = box.env[MARKER]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=str(box.dir),
            env=env,
        )
    except OSError as exc:
        process.stderr.write(f"cannot start {box.shell}: {exc}\n".encode())
        process.exit(127)
        return
    assert proc.stdin and proc.stdout and proc.stderr
    feed = asyncio.ensure_future(_pump(process.stdin, proc.stdin, close_dst=True))
    outs = asyncio.gather(
        _pump(proc.stdout, process.stdout, close_dst=False), _pump(proc.stderr, process.stderr, close_dst=False)
    )
    closed = asyncio.ensure_future(process.wait_closed())
    finished = asyncio.ensure_future(asyncio.gather(proc.wait(), outs))
    await asyncio.wait({finished, closed}, return_when=asyncio.FIRST_COMPLETED)
    if not finished.done():
        # the client went away mid-command: hang up on it and what it started, as a terminal
        # would (a job started with nohup ignores the hang-up and lives on)
        for pid in [proc.pid, *descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGHUP)
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        finished.cancel()
        feed.cancel()
        return
    feed.cancel()
    closed.cancel()
    rc = proc.returncode if proc.returncode is not None else 255
    with contextlib.suppress(Exception):
        if rc < 0:
            name = signal.Signals(-rc).name.removeprefix("SIG")
            process.exit_with_signal(name)
        else:
            process.exit(rc)


async def _run_start_command(box: _Box, command: str) -> None:
    """The box's start command, once, detached from any session; output to ``onstart.log``."""
    with (box.dir / "onstart.log").open("ab") as log_file:
        proc = await asyncio.create_subprocess_exec(
            box.shell,
            "-c",
            command,
            cwd=box.dir,
            env=box.env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    await proc.wait()


async def serve_box(
    box_dir: Path,
    *,
    port: int,
    authorized_keys: Path,
    host_key: Path,
    user: str,
    base_python: str | None,
    env: Mapping[str, str] | None = None,
    start_command: str | None = None,
    host: str = "127.0.0.1",
) -> None:
    """Serve the box until SIGTERM/SIGINT (then ``exited``). Writes ``status.json`` as it goes."""
    import asyncssh

    t0 = time.monotonic()
    box_dir = box_dir.resolve()
    ctl = control_dir(box_dir)
    status_path = ctl / "status.json"
    (box_dir / "tmp").mkdir(parents=True, exist_ok=True)
    env_dir = ensure_box_env(box_dir, base_python) if base_python else None
    t_env = time.monotonic() - t0
    shell = "/bin/bash" if Path("/bin/bash").exists() else "/bin/sh"
    box = _Box(box_dir, user, authorized_keys, _command_env(box_dir, user, shell, env or {}, env_dir), shell)
    server_cls, sftp_cls = _server_classes()

    async def handle(process: Any) -> None:
        await _run_process(box, process)

    acceptor = await asyncssh.create_server(
        lambda: server_cls(box),
        host,
        port,
        server_host_keys=[str(host_key)],
        process_factory=handle,
        sftp_factory=sftp_cls,
        encoding=None,
        allow_scp=False,
        agent_forwarding=False,
        x11_forwarding=False,
        keepalive_interval=30,
        login_timeout=30,
    )
    bound = acceptor.get_port()
    _write_json(
        status_path,
        {
            "state": "running",
            "pid": os.getpid(),
            "host": host,
            "port": bound,
            "user": user,
            "ready_at": time.time(),
            "env_seconds": round(t_env, 4),
            "startup_seconds": round(time.monotonic() - t0, 4),
        },
    )
    tasks = [asyncio.ensure_future(_run_start_command(box, start_command))] if start_command else []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for task in tasks:
        task.cancel()
    acceptor.close()
    _write_json(status_path, {**read_json(status_path), "state": "exited", "exited_at": time.time()})


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m choline_provisioner.providers.localbox", description=__doc__)
    p.add_argument("--dir", required=True, type=Path, help="the box's folder (HOME and working folder)")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one, see .box/status.json)")
    p.add_argument("--authorized-key", required=True, help="authorized_keys file, or one public key line")
    p.add_argument("--host-key", required=True, type=Path, help="host private key file (made when missing)")
    p.add_argument("--user", default=None, help="the one login name accepted (default: this user)")
    p.add_argument("--base-python", default=sys.executable, help="interpreter of the shared base env ('' for none)")
    p.add_argument("--env-file", type=Path, default=None, help="JSON object of variables for every command")
    p.add_argument("--start-command", default=None, help="run once, detached, after the box accepts SSH")
    return p.parse_args(argv)


def _authorized_keys_file(box_dir: Path, value: str) -> Path:
    candidate = Path(value).expanduser()
    if candidate.is_file():
        return candidate.resolve()
    if not value.strip().startswith(("ssh-", "ecdsa-", "sk-")):
        raise SystemExit(f"--authorized-key: {value!r} is neither a file nor a public key line")
    path = control_dir(box_dir) / "authorized_keys"
    add_authorized_key(box_dir, value)
    return path.resolve()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    box_dir: Path = args.dir.expanduser().resolve()
    box_dir.mkdir(parents=True, exist_ok=True)
    ctl = control_dir(box_dir)
    ctl.mkdir(exist_ok=True)
    _write_json(ctl / "status.json", {"state": "starting", "pid": os.getpid(), "started_at": time.time()})
    os.chdir(box_dir)  # relative SFTP paths resolve here
    try:
        authorized = _authorized_keys_file(box_dir, args.authorized_key)
        host_key = args.host_key.expanduser().resolve()
        if not host_key.exists():
            generate_host_key(host_key)
        env = read_json(args.env_file) if args.env_file else {}
        asyncio.run(
            serve_box(
                box_dir,
                port=args.port,
                authorized_keys=authorized,
                host_key=host_key,
                user=args.user or getpass.getuser(),
                base_python=args.base_python or None,
                env={str(k): str(v) for k, v in env.items()},
                start_command=args.start_command,
            )
        )
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            return 0
        _write_json(ctl / "status.json", {"state": "failed", "pid": os.getpid(), "message": f"{exc}"[:500]})
        sys.stderr.write(f"localbox: {type(exc).__name__}: {exc}\n")
        return 1
    return 0


# --- the starter's side ----------------------------------------------------------------------
@dataclass(frozen=True)
class BoxInfo:
    """What ``status.json`` and ``launch.json`` say about a box (``state`` is ``box_state``)."""

    dir: Path
    state: str
    pid: int | None
    port: int | None
    user: str | None
    message: str | None = None


def _clean_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in _KEEP_ENV if k in os.environ}
    env.setdefault("PATH", _DEFAULT_PATH)
    return env


def start_box(
    box_dir: Path | str,
    *,
    authorized_key: str | Path,
    host_key: Path | str | None = None,
    port: int = 0,
    user: str | None = None,
    base_python: str | None = sys.executable,
    env: Mapping[str, str] | None = None,
    start_command: str | None = None,
    python: str | None = None,
) -> int:
    """Launch a box server detached (its own session and process group) and return its pid.

    Returns at once; ``wait_box_ready`` waits for SSH. ``authorized_key`` is an
    authorized_keys file or one public key line; ``host_key`` defaults to ``D/.box/host_key``
    (generated when missing). The server gets a scrubbed environment: nothing of the caller's
    (cloud keys, S3 secrets) reaches the box. ``base_python=None`` gives the box no venv.
    """
    d = Path(box_dir).expanduser().resolve()
    ctl = control_dir(d)
    ctl.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    hk = Path(host_key).expanduser().resolve() if host_key else ctl / "host_key"
    if not hk.exists():
        generate_host_key(hk)
    ak = str(authorized_key)
    if not Path(ak).expanduser().is_file():
        add_authorized_key(d, ak)
        ak = str(ctl / "authorized_keys")
    argv = [
        python or sys.executable,
        "-m",
        "choline_provisioner.providers.localbox",
        "--dir",
        str(d),
        "--port",
        str(port),
        "--authorized-key",
        ak,
        "--host-key",
        str(hk),
        "--user",
        user or getpass.getuser(),
        "--base-python",
        base_python or "",
    ]
    if env:
        _write_json(ctl / "env.json", dict(env))
        (ctl / "env.json").chmod(0o600)
        argv += ["--env-file", str(ctl / "env.json")]
    if start_command:
        argv += ["--start-command", start_command]
    with contextlib.suppress(FileNotFoundError):
        (ctl / "status.json").unlink()
    with (ctl / "server.log").open("ab") as log_file:
        proc = subprocess.Popen(
            argv,
            cwd=d,
            env={**_clean_env(), MARKER: str(d)},
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    stat = _proc_stat(proc.pid)
    _write_json(
        ctl / "launch.json",
        {"pid": proc.pid, "start_ticks": stat[1] if stat else None, "launched_at": time.time(), "argv": argv[:3]},
    )
    return proc.pid


def read_box(box_dir: Path | str) -> BoxInfo:
    """The box's state: ``gone`` (no folder), ``loading``, ``running``, ``exited`` or ``offline``.

    ``offline``: the server process is dead without having said goodbye (killed, crashed) or
    was never launched. ``exited``: it stopped cleanly or failed to start (see ``message``).
    """
    d = Path(box_dir)
    if not d.is_dir():
        return BoxInfo(d, "gone", None, None, None)
    ctl = control_dir(d)
    status = read_json(ctl / "status.json")
    pid, ticks = _server_pid(d)
    port, user, message = status.get("port"), status.get("user"), status.get("message")
    if pid is None:
        return BoxInfo(d, "offline", None, None, None, "never launched")
    if process_alive(pid, ticks):
        state = "running" if status.get("state") == "running" else "loading"
        if status.get("state") in ("exited", "failed"):
            state = "loading"  # stopping; it will be exited in a moment
        return BoxInfo(d, state, pid, port, user, message)
    if status.get("state") in ("exited", "failed"):
        return BoxInfo(d, "exited", pid, port, user, message or "stopped")
    return BoxInfo(d, "offline", pid, port, user, "box process died")


def box_state(box_dir: Path | str) -> str:
    return read_box(box_dir).state


async def wait_box_ready(box_dir: Path | str, timeout: float = 30.0) -> BoxInfo:
    """Wait until the box accepts SSH; ``RuntimeError`` when it dies first or takes too long."""
    deadline = time.monotonic() + timeout
    while True:
        info = read_box(box_dir)
        if info.state == "running":
            return info
        if info.state in ("exited", "offline", "gone"):
            raise RuntimeError(f"box {box_dir} is {info.state}: {info.message or 'see .box/server.log'}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"box {box_dir} not ready after {timeout:g}s")
        await asyncio.sleep(0.02)


def _server_pid(box_dir: Path) -> tuple[int | None, int | None]:
    """The server's pid (and start time when the starter recorded it): from ``launch.json``,
    else from ``status.json`` (a server started by hand records its own pid first thing)."""
    launch = read_json(control_dir(box_dir) / "launch.json")
    if isinstance(launch.get("pid"), int):
        return launch["pid"], launch.get("start_ticks")
    status = read_json(control_dir(box_dir) / "status.json")
    return (status["pid"], None) if isinstance(status.get("pid"), int) else (None, None)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def kill_box(box_dir: Path | str, *, timeout: float = 10.0) -> None:
    """Kill the box like a machine dies: SIGKILL its process group and every process carrying
    its marker (a job that called setsid). Idempotent; the folder stays (state ``offline``)."""
    d = Path(box_dir).resolve()
    pid, ticks = _server_pid(d)
    if pid is not None and process_alive(pid, ticks):
        _signal_group(pid, signal.SIGKILL)  # the server leads its own group: everything in it dies
        deadline = time.monotonic() + timeout
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
    deadline = time.monotonic() + timeout
    while (pids := marked_processes(MARKER, str(d))) and time.monotonic() < deadline:
        for p in pids:  # a killed process keeps its environment until it is really gone
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
        time.sleep(0.01)


async def stop_box(box_dir: Path | str, *, timeout: float = 10.0) -> None:
    """Stop the box cleanly: its server records ``exited``; its commands end with it."""
    d = Path(box_dir).resolve()
    pid, ticks = _server_pid(d)
    if pid is not None and process_alive(pid, ticks):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while process_alive(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    kill_box(d)  # whatever the box ran goes with it, as on a stopped machine


def remove_box(box_dir: Path | str) -> None:
    """Kill the box and delete its folder (idempotent)."""
    d = Path(box_dir)
    if d.exists():
        kill_box(d)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
