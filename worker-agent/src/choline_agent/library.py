"""The agent's end of the Unix socket the training library connects to (``choline_core.agent_protocol``).

Newline-delimited JSON both ways. Rank 0 of the script connects (and reconnects after a drop); the
newest connection that said ``hello`` is the one the agent writes to. Messages for the library sent while
none is connected wait in a queue and go out after the next ``hello``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from choline_core import agent_protocol as proto

log = logging.getLogger(__name__)

MAX_LINE = 16 * 1024 * 1024
SOCKET_MAX = 100  # bytes; the kernel's limit is 107


def socket_path(workdir: Path) -> Path:
    """``<workdir>/agent.sock``, or a short path under the temp folder when that would be too long."""
    path = workdir / "agent.sock"
    if len(os.fsencode(str(path))) <= SOCKET_MAX:
        return path
    tag = hashlib.sha256(str(workdir.resolve()).encode()).hexdigest()[:12]
    short = Path(tempfile.gettempdir()) / f"choline-{tag}" / "agent.sock"
    if len(os.fsencode(str(short))) > SOCKET_MAX:
        short = Path("/tmp") / f"choline-{tag}" / "agent.sock"
    return short


OnMessage = Callable[[proto.Message], Awaitable[None]]


class LibraryServer:
    def __init__(self, path: Path, on_message: OnMessage) -> None:
        self.path = path
        self.on_message = on_message
        self.hellos: list[proto.Hello] = []
        self._server: asyncio.AbstractServer | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._queue: list[proto.Message] = []
        self._lock = asyncio.Lock()
        self._open = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    @property
    def ever_connected(self) -> bool:
        return bool(self.hellos)

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_LINE)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        if self._writer is not None:
            self._writer.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def send(self, msg: proto.Message) -> None:
        async with self._lock:
            if not self.connected:
                self._queue.append(msg)
                return
            assert self._writer is not None
            try:
                self._writer.write(proto.encode(msg))
                await self._writer.drain()
            except (ConnectionError, OSError):
                self._queue.append(msg)

    async def _flush_queue(self, writer: asyncio.StreamWriter) -> None:
        async with self._lock:
            queued, self._queue = self._queue, []
            try:
                for msg in queued:
                    writer.write(proto.encode(msg))
                await writer.drain()
            except (ConnectionError, OSError):
                self._queue = queued + self._queue

    async def wait_closed(self, timeout: float) -> bool:
        """Until every library connection has been read to its end (or ``timeout``); True if so."""
        if self._idle.is_set():
            return True
        waiter = asyncio.ensure_future(self._idle.wait())
        try:
            done, _ = await asyncio.wait({waiter}, timeout=timeout)
        finally:
            waiter.cancel()
        return bool(done)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        self._idle.clear()
        try:
            while True:
                try:
                    line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    log.warning("the library sent a line over %d bytes; closing its connection", MAX_LINE)
                    break
                except (ConnectionError, OSError):
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                try:
                    msg = proto.decode(line)
                except ValueError as exc:
                    log.warning("ignoring a malformed line from the library: %s", exc)
                    continue
                if msg is None:
                    continue  # a type this agent does not know (a newer library)
                if isinstance(msg, proto.Hello):
                    self.hellos.append(msg)
                    self._writer = writer
                    await self._flush_queue(writer)
                try:
                    await self.on_message(msg)
                except Exception:
                    log.exception("handling %s from the library failed", msg.TYPE)
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
            self._open -= 1
            if self._open == 0:
                self._idle.set()
