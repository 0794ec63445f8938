"""The SSH client the provisioner uses for everything it does on a box.

- Per-run key pairs (ed25519, generated with asyncssh) under ``$CHOLINE_HOME/keys/<run>/``,
  private key 0600 in a 0700 folder. Key material never reaches a log line, an exception
  message or a ``repr``.
- Host keys: a key the provider knows out of band (``SshEndpoint.host_key``: local boxes) is
  required exactly; otherwise the first key seen is pinned in ``$CHOLINE_HOME/known_hosts``
  under ``SshEndpoint.pin_name`` and required from then on. A changed key raises
  ``HostKeyChanged`` (and logs a warning with both fingerprints): it is never accepted.
- Nothing of the user's travels: no ``~/.ssh/config``, no ssh-agent, no agent forwarding, no
  ``~/.ssh/known_hosts``; only the one key given.
- Commands run in the endpoint's ``workdir`` with its ``env`` exported, through ``sh -c`` so
  the login shell's dialect does not matter.
- Errors map onto choline's tree: ``SshUnreachable`` (retryable: refused, timed out, dropped),
  ``SshAuthFailed``, ``HostKeyChanged``, ``CommandFailed``, ``CommandTimeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import posixpath
import re
import shlex
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from choline_core.errors import InfraError, NotFound, Retryable
from choline_core.settings import choline_home, write_private

from .providers.base import SshEndpoint

log = logging.getLogger(__name__)

KEY_ALGORITHM = "ssh-ed25519"
KNOWN_HOSTS_FILE = "known_hosts"
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# --- errors --------------------------------------------------------------------------------
class SshError(InfraError):
    kind = "ssh_error"


class SshUnreachable(SshError, Retryable):
    """The SSH server could not be reached or the connection dropped; try again later."""

    kind = "ssh_unreachable"


class SshAuthFailed(SshError):
    """The server refused our key (it may not be installed yet on a booting box)."""

    kind = "ssh_auth_failed"


class HostKeyChanged(SshError):
    """The server presented a host key other than the one pinned or announced: refused."""

    kind = "host_key_changed"


class CommandFailed(SshError):
    """A command exited non-zero where success was required (``check=True``)."""

    kind = "command_failed"


class CommandTimeout(SshError):
    """A command ran past its timeout; its channel was closed (the box kills it)."""

    kind = "command_timeout"


# --- keys ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyPair:
    """A private key file and its public key line. The private key is read only when used."""

    private_path: Path
    public_key: str

    def load_private(self) -> asyncssh.SSHKey:
        return asyncssh.read_private_key(str(self.private_path))

    @property
    def fingerprint(self) -> str:
        return asyncssh.import_public_key(self.public_key).get_fingerprint()

    def __repr__(self) -> str:  # never the key itself
        return f"KeyPair(private_path={str(self.private_path)!r}, fingerprint={self.fingerprint!r})"


def keys_dir(run_id: str, home: Path | None = None) -> Path:
    if not _RUN_ID_RE.match(run_id):
        raise ValueError(f"run id {run_id!r} cannot name a key folder")
    return (home or choline_home()) / "keys" / run_id


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def public_key_line(key: asyncssh.SSHKey, comment: str | None = None) -> str:
    """``ssh-ed25519 AAAA... [comment]`` for any asyncssh key (private or public)."""
    pub = key.convert_to_public() if hasattr(key, "convert_to_public") else key
    parts = pub.export_public_key("openssh").decode().split()
    line = " ".join(parts[:2])
    return f"{line} {comment}" if comment else line


def ensure_run_key(run_id: str, *, home: Path | None = None) -> KeyPair:
    """The run's key pair, generated on first use (safe to call concurrently and again)."""
    folder = keys_dir(run_id, home)
    private = folder / "id_ed25519"
    public = folder / "id_ed25519.pub"
    with _file_lock(folder / ".lock"):
        if private.exists() and public.exists():
            return KeyPair(private, public.read_text().strip())
        key = asyncssh.generate_private_key(KEY_ALGORITHM, comment=f"choline-run-{run_id}")
        line = public_key_line(key, f"choline-run-{run_id}")
        write_private(private, key.export_private_key("openssh"))
        write_private(public, line + "\n")
    log.info("generated SSH key pair for run %s (%s)", run_id, asyncssh.import_public_key(line).get_fingerprint())
    return KeyPair(private, line)


def load_run_key(run_id: str, *, home: Path | None = None) -> KeyPair:
    """The run's existing key pair; ``NotFound`` when it was never made or was deleted."""
    folder = keys_dir(run_id, home)
    private, public = folder / "id_ed25519", folder / "id_ed25519.pub"
    if not (private.exists() and public.exists()):
        raise NotFound(f"no SSH key pair for run {run_id}", hint=f"expected under {folder}")
    return KeyPair(private, public.read_text().strip())


def delete_run_key(run_id: str, *, home: Path | None = None) -> None:
    """Remove the run's key pair (idempotent)."""
    folder = keys_dir(run_id, home)
    for name in ("id_ed25519", "id_ed25519.pub", ".lock"):
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


# --- host keys -----------------------------------------------------------------------------
def _normal_key(text: str) -> str:
    """``type base64`` of a public key line (comment dropped)."""
    return public_key_line(asyncssh.import_public_key(text.strip()))


def _fingerprint(text: str) -> str:
    try:
        return asyncssh.import_public_key(text).get_fingerprint()
    except (asyncssh.KeyImportError, ValueError):
        return "unreadable key"


class KnownHosts:
    """Pinned host keys, one ``NAME TYPE BASE64`` line each (OpenSSH's format when NAME is
    ``[host]:port``). Names are ``SshEndpoint.pin_name``: providers that reuse addresses for
    different machines (local boxes, vast.ai ports) pin per instance, not per address."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or choline_home() / KNOWN_HOSTS_FILE

    def _read(self) -> dict[str, str]:
        out: dict[str, str] = {}
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 3 and not parts[0].startswith("#"):
                out[parts[0]] = f"{parts[1]} {parts[2]}"
        return out

    def _write(self, entries: dict[str, str]) -> None:
        write_private(self.path, "".join(f"{name} {key}\n" for name, key in sorted(entries.items())))

    def get(self, name: str) -> str | None:
        return self._read().get(name)

    def pin(self, name: str, key: str) -> None:
        """Pin ``key`` under ``name``, replacing any earlier pin (callers check first)."""
        if any(c.isspace() for c in name) or not name:
            raise ValueError(f"host key name {name!r} must be one word")
        with _file_lock(self.path.with_name(self.path.name + ".lock")):
            entries = self._read()
            entries[name] = _normal_key(key)
            self._write(entries)

    def forget(self, name: str) -> None:
        """Drop the pin (when the instance is destroyed; idempotent)."""
        with _file_lock(self.path.with_name(self.path.name + ".lock")):
            entries = self._read()
            if entries.pop(name, None) is not None:
                self._write(entries)


class _PinningClient(asyncssh.SSHClient):
    def __init__(self, expected: str | None) -> None:
        self.expected = expected
        self.presented: str | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        self.presented = public_key_line(key)
        return self.expected is None or self.presented == self.expected


# --- commands, forwards --------------------------------------------------------------------
@dataclass
class CommandResult:
    """A finished command: ``exit_status`` is ``None`` when a signal (``signal``) ended it."""

    command: str
    exit_status: int | None
    stdout: str
    stderr: str
    signal: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def check(self) -> CommandResult:
        if not self.ok:
            tail = (self.stderr or self.stdout).strip().splitlines()[-3:]
            status = f"signal {self.signal}" if self.signal else f"status {self.exit_status}"
            raise CommandFailed(
                f"command {self.command.split()[0] if self.command.split() else '?'!r} failed with {status}: "
                + (" | ".join(tail) or "no output"),
                detail={"exit_status": self.exit_status, "signal": self.signal},
            )
        return self


@dataclass
class Forward:
    """An open port forward. ``remote``: the box listens on ``listen_port`` (its loopback) and
    connections come to ``dest_host:dest_port`` on this side; ``local``: the other way round."""

    kind: str
    listen_host: str
    listen_port: int
    dest_host: str
    dest_port: int
    _listener: Any = field(repr=False, default=None)

    def close(self) -> None:
        self._listener.close()

    async def wait_closed(self) -> None:
        await self._listener.wait_closed()


def shell_path(path: str) -> str:
    """Quote a path for sh, keeping a leading ``~`` meaning the login's home."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


class SshConnection:
    """One SSH connection to a box. Open with ``SshConnection.open`` (or ``connect_retrying``)."""

    def __init__(self, conn: asyncssh.SSHClientConnection, endpoint: SshEndpoint, host_key: str) -> None:
        self.raw = conn
        self.endpoint = endpoint
        self.host_key = host_key

    @classmethod
    async def open(
        cls,
        endpoint: SshEndpoint,
        key: KeyPair | None,
        *,
        known_hosts: KnownHosts | None = None,
        connect_timeout: float = 15.0,
        keepalive_interval: float = 15.0,
        keepalive_count_max: int = 3,
    ) -> SshConnection:
        """Connect and authenticate with ``endpoint.key_path`` if set, else ``key``.

        The host key is checked as the module doc says; on first contact it is pinned. A dead
        peer is noticed after about ``keepalive_interval * keepalive_count_max`` seconds.
        """
        pins = known_hosts or KnownHosts()
        if endpoint.key_path:
            key_file = Path(endpoint.key_path).expanduser()
        elif key is not None:
            key_file = key.private_path
        else:
            raise SshAuthFailed(f"no key to log in to {endpoint.pin_name} with")
        try:
            client_key = asyncssh.read_private_key(str(key_file))
        except (OSError, asyncssh.KeyImportError) as exc:
            raise SshAuthFailed(
                f"cannot read the private key {key_file}: {type(exc).__name__}",
                hint="a passphrase-protected key cannot be used unattended; give choline a key without one",
            ) from None
        announced = _normal_key(endpoint.host_key) if endpoint.host_key else None
        pinned = None if announced else pins.get(endpoint.pin_name)
        expected = announced or pinned
        client = _PinningClient(expected)
        where = f"{endpoint.user}@{endpoint.host}:{endpoint.port}"
        try:
            conn, _ = await asyncio.wait_for(
                asyncssh.create_connection(
                    lambda: client,
                    endpoint.host,
                    endpoint.port,
                    username=endpoint.user,
                    client_keys=[client_key],
                    known_hosts=lambda _h, _a, _p: ([], [], []),
                    config=None,
                    agent_path=None,
                    agent_forwarding=False,
                    password=None,
                    kbdint_auth=False,
                    preferred_auth="publickey",
                    keepalive_interval=keepalive_interval,
                    keepalive_count_max=keepalive_count_max,
                    connect_timeout=connect_timeout,
                    login_timeout=connect_timeout,
                ),
                timeout=connect_timeout + 5,
            )
        except asyncssh.HostKeyNotVerifiable:
            presented = client.presented or "?"
            log.warning(
                "host key of %s (%s) changed: expected %s, presented %s; refusing to connect",
                endpoint.pin_name,
                where,
                _fingerprint(expected or ""),
                _fingerprint(presented),
            )
            raise HostKeyChanged(
                f"the host key of {endpoint.pin_name} ({where}) is not the one "
                f"{'the provider announced' if announced else 'pinned at first contact'}; refusing to connect",
                hint="the machine was replaced or someone is in the middle; if the machine was rebuilt on purpose, "
                f"remove its line from {pins.path}",
                detail={
                    "pin": endpoint.pin_name,
                    "expected": _fingerprint(expected or ""),
                    "presented": _fingerprint(presented),
                },
            ) from None
        except asyncssh.PermissionDenied:
            raise SshAuthFailed(
                f"{where} refused our key", hint="the key may not be installed on the box yet"
            ) from None
        except (OSError, asyncio.TimeoutError, asyncssh.DisconnectError) as exc:
            raise SshUnreachable(f"cannot reach {where}: {type(exc).__name__}: {exc}") from None
        presented = client.presented or ""
        if expected is None and presented:
            pins.pin(endpoint.pin_name, presented)
            log.info(
                "pinned host key of %s (%s) at first contact: %s", endpoint.pin_name, where, _fingerprint(presented)
            )
        return cls(conn, endpoint, presented)

    # -- commands --
    def _wrap(self, command: str, cwd: str | None, env: Mapping[str, str] | None) -> str:
        all_env = {**self.endpoint.env, **(env or {})}
        workdir = cwd if cwd is not None else self.endpoint.workdir
        if not all_env and not workdir:
            return command
        lines = [f"export {k}={shlex.quote(v)}" for k, v in all_env.items()]
        if workdir:
            lines.append(f"cd {shell_path(workdir)} || exit 97")
        lines.append(command)
        return "sh -c " + shlex.quote("\n".join(lines))

    async def run(
        self,
        command: str,
        *,
        timeout: float | None = None,
        check: bool = False,
        input: str | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> CommandResult:
        """Run ``command`` on the box and collect its exit status and output (UTF-8, lenient).

        Runs in ``cwd`` (default: the endpoint's workdir) with the endpoint's env plus ``env``.
        ``timeout`` closes the channel (``CommandTimeout``); ``check`` raises ``CommandFailed``
        on a non-zero status. A background job (``nohup ... &`` with its output redirected)
        outlives the command and the connection.
        """
        line = self._wrap(command, cwd, env)
        try:
            process = await self.raw.create_process(line, input=input, encoding="utf-8", errors="replace")
            try:
                res = await process.wait(check=False, timeout=timeout)
            finally:
                process.close()  # after a timeout or a cancel this closes the channel: the box hangs up
        except asyncssh.TimeoutError:
            raise CommandTimeout(f"command {command.split()[0] if command else '?'!r} ran past {timeout}s") from None
        except (asyncssh.DisconnectError, asyncssh.ChannelOpenError, OSError) as exc:
            raise SshUnreachable(f"connection to {self.endpoint.pin_name} lost: {type(exc).__name__}") from None
        killed_by = res.exit_signal[0] if res.exit_signal else None
        out = CommandResult(
            command=command,
            exit_status=None if killed_by else res.exit_status,
            stdout=str(res.stdout or ""),
            stderr=str(res.stderr or ""),
            signal=killed_by,
        )
        return out.check() if check else out

    # -- files --
    def remote_path(self, path: str) -> str:
        """Where ``path`` lands on the box: absolute stays, ``~/x`` and relative go under home /
        the endpoint's workdir (SFTP's own working folder is the login's home)."""
        if path.startswith("/"):
            return path
        if path == "~" or path.startswith("~/"):
            return path[2:] or "."
        wd = self.endpoint.workdir or ""
        if wd == "~" or wd.startswith("~/"):
            wd = wd[2:]
        return posixpath.normpath(posixpath.join(wd, path)) if wd else path

    async def upload(self, local: Path | str, remote: str) -> None:
        """Copy a file or a folder's contents to ``remote`` (made with its parents)."""
        src = Path(local)
        dst = self.remote_path(remote)
        try:
            async with self.raw.start_sftp_client() as sftp:
                if src.is_dir():
                    await sftp.makedirs(dst, exist_ok=True)
                    children = [str(p) for p in src.iterdir()]
                    if children:
                        await sftp.put(children, dst, recurse=True, preserve=True)
                else:
                    parent = posixpath.dirname(dst)
                    if parent:
                        await sftp.makedirs(parent, exist_ok=True)
                    await sftp.put(str(src), dst, preserve=True)
        except asyncssh.SFTPError as exc:
            raise SshError(f"upload of {src} to {dst} failed: {exc.reason}") from None
        except (asyncssh.DisconnectError, asyncssh.ChannelOpenError, OSError) as exc:
            raise SshUnreachable(f"upload to {self.endpoint.pin_name} failed: {type(exc).__name__}: {exc}") from None

    async def download(self, remote: str, local: Path | str) -> None:
        """Copy a remote file, or a remote folder's contents, to ``local`` (made with parents)."""
        src = self.remote_path(remote)
        dst = Path(local)
        try:
            async with self.raw.start_sftp_client() as sftp:
                if await sftp.isdir(src):
                    dst.mkdir(parents=True, exist_ok=True)
                    names = [n for n in await sftp.listdir(src) if n not in (".", "..")]
                    if names:
                        await sftp.get([posixpath.join(src, n) for n in names], str(dst), recurse=True, preserve=True)
                else:
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    await sftp.get(src, str(dst), preserve=True)
        except asyncssh.SFTPError as exc:
            raise SshError(f"download of {src} failed: {exc.reason}") from None
        except (asyncssh.DisconnectError, asyncssh.ChannelOpenError) as exc:
            raise SshUnreachable(f"download from {self.endpoint.pin_name} failed: {type(exc).__name__}") from None

    # -- forwards --
    async def forward_remote(
        self, dest_host: str, dest_port: int, *, listen_port: int = 0, listen_host: str = "127.0.0.1"
    ) -> Forward:
        """The box listens on ``listen_host:listen_port`` (0: any free port, see the result) and
        each connection there reaches ``dest_host:dest_port`` on this side (tunnelled mode)."""
        try:
            listener = await self.raw.forward_remote_port(listen_host, listen_port, dest_host, dest_port)
        except asyncssh.ChannelListenError as exc:
            raise SshError(
                f"{self.endpoint.pin_name} refused to listen on {listen_host}:{listen_port}: {exc}"
            ) from None
        except (asyncssh.DisconnectError, OSError) as exc:
            raise SshUnreachable(f"connection to {self.endpoint.pin_name} lost: {type(exc).__name__}") from None
        return Forward("remote", listen_host, listener.get_port(), dest_host, dest_port, listener)

    async def forward_local(
        self, dest_host: str, dest_port: int, *, listen_port: int = 0, listen_host: str = "127.0.0.1"
    ) -> Forward:
        """This side listens on ``listen_host:listen_port`` and each connection reaches
        ``dest_host:dest_port`` as seen from the box. The box may refuse per connection (a local
        box allows loopback destinations only): the connection is then closed at once."""
        try:
            listener = await self.raw.forward_local_port(listen_host, listen_port, dest_host, dest_port)
        except (asyncssh.DisconnectError, OSError) as exc:
            raise SshUnreachable(f"cannot listen for {self.endpoint.pin_name}: {type(exc).__name__}: {exc}") from None
        return Forward("local", listen_host, listener.get_port(), dest_host, dest_port, listener)

    # -- lifetime --
    @property
    def closed(self) -> bool:
        return self.raw.is_closed()

    async def wait_closed(self) -> None:
        """Return when the connection ends (closed by either side, or keep-alives unanswered)."""
        await self.raw.wait_closed()

    async def close(self) -> None:
        self.raw.close()
        with contextlib.suppress(Exception):
            await self.raw.wait_closed()

    async def __aenter__(self) -> SshConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def connect(endpoint: SshEndpoint, key: KeyPair | None, **options: Any) -> SshConnection:
    """``SshConnection.open`` under a shorter name."""
    return await SshConnection.open(endpoint, key, **options)


async def connect_retrying(
    endpoint: SshEndpoint,
    key: KeyPair | None,
    *,
    timeout: float = 60.0,
    interval: float = 1.0,
    **options: Any,
) -> SshConnection:
    """Connect, retrying unreachable servers and refused keys (a booting box) until ``timeout``.

    A changed host key is never retried. Use it to reconnect after ``wait_closed`` returns
    (then re-open the forwards: they die with the connection).
    """
    deadline = time.monotonic() + timeout
    delay = min(0.1, interval)
    while True:
        try:
            return await SshConnection.open(endpoint, key, **options)
        except (SshUnreachable, SshAuthFailed) as exc:
            if time.monotonic() + delay > deadline:
                raise type(exc)(f"{exc.message} (gave up after {timeout:g}s)", hint=exc.hint) from None
            log.debug("ssh %s not ready: %s", endpoint.pin_name, exc.message)
        await asyncio.sleep(delay)
        delay = min(delay * 2, interval)
