"""Serving the emulator: in a background thread (tests) or as a process (``python -m vast_emulator``).

``EmulatorServer(emulator, api_key).start()`` binds 127.0.0.1 on a free port and serves in a
thread; ``.url`` is what to give the SDK (``server_url=``) or the CLI (``--url``); ``.stop()``
shuts the server down and destroys every instance. Also a context manager.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn

from .app import create_app
from .core import Emulator


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: a free port), handed to uvicorn."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class EmulatorServer:
    """One emulator served over HTTP from a thread of this process."""

    def __init__(self, emulator: Emulator, api_key: str, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.emulator = emulator
        self.api_key = api_key
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> EmulatorServer:
        self._sock = bind(self.host, self.port)
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(
            create_app(self.emulator, self.api_key),
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name=f"vast-emulator:{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the vast emulator's server thread ended before it started")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the vast emulator did not start within {timeout:g}s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Shut the server down (its lifespan destroys every instance); idempotent."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self.emulator.close()  # also when the server never got as far as its lifespan
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
