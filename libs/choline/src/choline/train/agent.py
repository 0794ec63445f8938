"""The library's end of the worker-agent's Unix socket (see ``choline_core.agent_protocol``).

Sending never blocks training: messages go into a bounded queue that a sender thread writes out. A reader
thread parses what the agent sends: ``uploaded`` goes to a callback (the run deletes its local copy),
``control`` into a queue the run exposes with ``pending_controls()``. If the connection drops, the sender
reconnects with back-off, says ``hello`` again and re-announces the checkpoints the agent has not yet
confirmed (``on_connect`` returns them); metric messages queued meanwhile are sent then.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable

from choline_core.agent_protocol import Control, Hello, Message, Uploaded, decode, encode

log = logging.getLogger(__name__)

MAX_QUEUED = 10_000


class AgentLink:
    """A connection to the agent at ``path``. Only global rank 0 opens one."""

    def __init__(
        self,
        path: str,
        hello: Hello,
        *,
        on_uploaded: Callable[[int], None] | None = None,
        on_connect: Callable[[], list[Message]] | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        self.path = path
        self.hello = hello
        self.on_uploaded = on_uploaded
        self.on_connect = on_connect
        self.controls: collections.deque[Control] = collections.deque()
        self._out: queue.Queue[Message] = queue.Queue(maxsize=MAX_QUEUED)
        self._sock: socket.socket | None = None
        self._sock_lock = threading.Lock()
        self._connected = threading.Event()
        self._closing = threading.Event()
        self._dropped = 0
        self._sent = 0
        self._connect(deadline=time.monotonic() + connect_timeout, first=True)
        self._sender = threading.Thread(target=self._send_loop, name="choline-agent-send", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="choline-agent-read", daemon=True)
        self._sender.start()
        self._reader.start()

    # ---------------------------------------------------------------------------------- connection
    def _connect(self, deadline: float, first: bool = False) -> bool:
        delay = 0.05
        while not self._closing.is_set():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
            except OSError as exc:
                s.close()
                if time.monotonic() >= deadline:
                    if first:
                        log.warning("the choline agent at %s is not reachable (%s); will keep trying", self.path, exc)
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            try:
                s.sendall(encode(self.hello))
                for msg in self.on_connect() if self.on_connect else []:
                    s.sendall(encode(msg))
            except OSError:
                s.close()
                continue
            with self._sock_lock:
                self._sock = s
            self._connected.set()
            return True
        return False

    def _drop(self, s: socket.socket) -> None:
        with self._sock_lock:
            if self._sock is s:
                self._sock = None
                self._connected.clear()
        with contextlib.suppress(OSError):
            s.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # ---------------------------------------------------------------------------------- sending
    def send(self, msg: Message) -> None:
        """Queue ``msg``; never blocks. When the agent is far behind, the oldest queued message is dropped."""
        while True:
            try:
                self._out.put_nowait(msg)
                return
            except queue.Full:
                try:
                    self._out.get_nowait()
                    self._out.task_done()
                except queue.Empty:
                    continue
                self._dropped += 1
                if self._dropped in (1, 100, 10_000):
                    log.warning("the agent is not reading: %d messages dropped (metrics.jsonl has them)", self._dropped)

    def _send_loop(self) -> None:
        while True:
            if self._closing.is_set():
                return
            if self._sock is None:
                self._connect(deadline=time.monotonic() + 1.0)
            try:
                msg = self._out.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                while True:
                    s = self._sock
                    if s is None:
                        if self._closing.is_set():
                            return
                        if not self._connect(deadline=time.monotonic() + 1.0):
                            time.sleep(0.5)
                        continue
                    try:
                        s.sendall(encode(msg))
                        self._sent += 1
                        break
                    except OSError as exc:
                        log.warning("lost the connection to the choline agent (%s); reconnecting", exc)
                        self._drop(s)
            finally:
                self._out.task_done()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued message is written to the socket (or ``timeout``); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._out.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    # ---------------------------------------------------------------------------------- reading
    def _read_loop(self) -> None:
        while not self._closing.is_set():
            if not self._connected.wait(0.5):
                continue
            s = self._sock
            if s is None:
                continue
            buf = b""
            try:
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if line.strip():
                            self._handle(line)
            except OSError:
                pass
            if not self._closing.is_set():
                log.warning("the choline agent closed the connection; reconnecting")
            self._drop(s)  # the sender reconnects (it polls even when the script is quiet)

    def _handle(self, line: bytes) -> None:
        try:
            msg = decode(line)
        except ValueError as exc:
            log.warning("ignoring a malformed line from the agent: %s", exc)
            return
        if isinstance(msg, Uploaded):
            if self.on_uploaded is not None:
                try:
                    self.on_uploaded(msg.step)
                except Exception:
                    log.exception("handling uploaded(step=%s) failed", msg.step)
        elif isinstance(msg, Control):
            self.controls.append(msg)

    # ---------------------------------------------------------------------------------- shutdown
    def close(self, timeout: float = 2.0) -> None:
        if self.connected:
            self.flush(timeout)
        self._closing.set()
        s = self._sock
        if s is not None:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            self._drop(s)
        self._sender.join(timeout=2)
        self._reader.join(timeout=2)


def socket_path_ok(path: str) -> bool:
    return len(os.fsencode(path)) < 108
