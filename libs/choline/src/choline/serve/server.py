"""Run a bundle as an HTTP server: load it, warm it up, listen, announce, drain on SIGTERM.

``python -m choline.serve BUNDLE --port 8000`` (or ``choline serve BUNDLE``). With ``--port 0`` the system
picks a free port; the process prints one JSON line ``{"event": "ready", "url": ..., "port": ..., "pid": ...}``
on stdout once it answers, and writes the same object to ``--ready-file`` (atomically) when given: that is
how the deploy service and the box's agent learn where it listens.

SIGTERM or SIGINT: ``/readyz`` turns 503, the listening socket closes, requests already received (queued or
computing) finish and get their answers, then the process exits 0. Requests still running after
``--drain-s`` are cancelled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

from .app import ServeConfig, ServingApp

log = logging.getLogger("choline.serve")
TOKEN_ENV = "CHOLINE_SERVE_TOKEN"


def _uvicorn_server(app: ServingApp, drain_s: float) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn, but a SIGTERM drains and exits 0 instead of re-raising the signal afterwards."""

        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            def on_signal(sig: int, frame: Any) -> None:
                app.draining = True
                app.ready = False
                if self.should_exit and sig == signal.SIGINT:
                    self.force_exit = True
                self.should_exit = True

            old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    config = uvicorn.Config(
        app,
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=max(1, round(drain_s)),
        timeout_keep_alive=30,
    )
    return Server(config)


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # asyncio sets TCP_NODELAY only then
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


async def serve(
    app: ServingApp,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    sock: socket.socket | None = None,
    ready_file: str | os.PathLike[str] | None = None,
    announce: bool = True,
) -> None:
    """Serve ``app`` until SIGTERM/SIGINT (or ``app``'s server is told to exit), then drain."""
    sock = sock or listen(host, port)
    bound = sock.getsockname()
    server = _uvicorn_server(app, app.config.drain_s)
    app.server = server  # type: ignore[attr-defined]  # lets an embedding test stop it
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.005)
    if server.started:
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        info = {"event": "ready", "url": f"http://{shown}:{bound[1]}", "port": bound[1], "pid": os.getpid()}
        if ready_file:
            _write_atomic(Path(ready_file), json.dumps(info))
        if announce:
            sys.stdout.write(json.dumps(info) + "\n")
            sys.stdout.flush()
    await task
    if ready_file:
        with contextlib.suppress(OSError):
            os.unlink(ready_file)


def _load(path: str, extract_to: str | None, device: str) -> Any:
    """A tarball unpacked into ``extract_to`` by an earlier start is loaded from there (its files are checked
    against the card either way)."""
    from choline.bundle import load_bundle

    if extract_to and Path(path).is_file() and Path(extract_to).is_dir():
        done = sorted(Path(extract_to).glob("*/card.json"))
        if done:
            return load_bundle(done[0].parent, device=device)
    return load_bundle(path, extract_to=extract_to, device=device)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m choline.serve", description="Serve a model bundle over HTTP.")
    p.add_argument("bundle", help="a bundle folder or .choline-bundle.tar.gz")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one; see --ready-file)")
    p.add_argument("--max-batch", type=int, default=32, help="most samples in one forward pass (1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="how long a batch waits to fill (0: never)")
    p.add_argument("--timeout-s", type=float, default=30.0, help="per-request timeout (504 after it)")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body (413 above it)")
    p.add_argument("--max-queue", type=int, default=4096, help="most samples waiting (503 above it)")
    p.add_argument("--drain-s", type=float, default=30.0, help="how long SIGTERM waits for requests in flight")
    p.add_argument(
        "--device", default="cpu", help="cpu, cuda, cuda:1 ..., or auto: cuda when there is one (default cpu)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--name", default=None, help="the name shown in /metadata (default: the card's)")
    p.add_argument("--version", default=None, help="the version shown in /metadata")
    p.add_argument("--extract-to", default=None, help="where a tarball is unpacked (default: a temporary folder)")
    p.add_argument("--ready-file", default=None, help="write {url, port, pid} here once serving")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue)):
        if value < 1:
            sys.stderr.write(f"error: {name} must be at least 1\n")
            return 2
    if args.max_wait_ms < 0 or args.timeout_s <= 0 or args.max_body_mb <= 0:
        sys.stderr.write("error: --max-wait-ms must be >= 0, --timeout-s and --max-body-mb > 0\n")
        return 2
    t0 = time.perf_counter()
    try:
        sock = listen(args.host, args.port)  # fail fast on a taken port, before the slow imports and load
    except OSError as exc:
        sys.stderr.write(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}\n")
        return 1
    import torch

    from choline.bundle import BundleError

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        bundle = _load(args.bundle, args.extract_to, args.device)
    except BundleError as exc:
        sys.stderr.write(f"error: {exc.one_line()}\n")
        return 1
    config = ServeConfig(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        timeout_s=args.timeout_s,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        max_queue=args.max_queue,
        drain_s=args.drain_s,
        name=args.name,
        version=args.version,
        token=os.environ.get(TOKEN_ENV) or None,
    )
    app = ServingApp(bundle, config)
    app.warmup()
    log.info("bundle %s loaded and warm in %.2f s", args.bundle, time.perf_counter() - t0)
    asyncio.run(serve(app, sock=sock, ready_file=args.ready_file))
    log.info("stopped")
    return 0
