"""The shape every control-plane service process shares.

``run_service(svc)``: settings and logging, NATS connection (retrying forever), streams
declared, a small HTTP server with ``/healthz`` and Prometheus ``/metrics``, the service's
own ``start()``, then a wait for SIGTERM/SIGINT, after which consumers finish the message
in hand and the NATS connection drains before the process exits.

The health server is a few lines of asyncio rather than FastAPI so that a service that
speaks only NATS starts in a fraction of a second and a few tens of MB. A service with an HTTP
API (the gateway) returns its ASGI app from ``Service.http_app()``: uvicorn then serves it on
that same port, in the service's own event loop, and the app answers ``/healthz`` and
``/metrics`` itself (``Service.health()`` and ``metrics_body()`` give it what to say).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from choline_core.bus import Bus, Consumer, Handler, install_stop_signals
from choline_core.logs import configure_logging
from choline_core.settings import CholineSettings
from choline_core.subjects import Subjects

log = logging.getLogger(__name__)

HANDLED = Counter("choline_handled_total", "Messages handled", ["service", "handler", "outcome"])
LATENCY = Histogram("choline_handler_seconds", "Handler latency", ["service", "handler"])
LAG = Gauge("choline_consumer_pending", "Messages waiting for a consumer", ["service", "consumer"])
UP = Gauge("choline_up", "1 while the service runs", ["service"])


class Service:
    """Subclass and override ``start()`` (register consumers) and ``checks()`` (readiness)."""

    name = "service"
    settings_cls: type[CholineSettings] = CholineSettings

    def __init__(self, settings: CholineSettings | None = None) -> None:
        self.settings = settings or self.settings_cls()
        self.subjects = Subjects(self.settings.subject_prefix)
        self.bus: Bus | None = None
        self.started_at = time.time()
        self.consumers: list[tuple[str, str, Consumer]] = []  # (stream, durable, consumer)
        self._lag_task: asyncio.Task[None] | None = None
        self.http_port: int | None = None  # the port /healthz answers on, once run_service started it

    async def consume(self, durable: str, filter_subject: str | list[str], handler: Handler, **kwargs: Any) -> Consumer:
        """``Bus.consume`` with the handler timed in ``/metrics`` and its backlog reported as lag."""
        assert self.bus is not None, "consume() is for start()"
        first = filter_subject if isinstance(filter_subject, str) else filter_subject[0]
        stream = kwargs.pop("stream", None) or self.subjects.stream_for(first.replace("*", "x").replace(">", "x"))
        consumer = await self.bus.consume(
            durable, filter_subject, self.timed(durable, handler), stream=stream, **kwargs
        )
        self.track(stream, durable, consumer)
        return consumer

    def track(self, stream: str, durable: str, consumer: Consumer) -> None:
        """Report a consumer's backlog in ``/metrics`` (``consume()`` does this for its own)."""
        self.consumers.append((stream, durable, consumer))
        if self._lag_task is None:
            self._lag_task = asyncio.create_task(self._report_lag())

    async def _report_lag(self) -> None:
        while True:
            for stream, durable, _ in list(self.consumers):
                try:
                    info = await self.bus.js.consumer_info(stream, durable)  # type: ignore[union-attr]
                    LAG.labels(self.name, durable).set(info.num_pending or 0)
                except Exception as exc:  # lag is best effort; never take the service down for it
                    log.debug("lag of %s/%s: %s", stream, durable, exc)
            await asyncio.sleep(5)

    async def start(self) -> None:
        """Register consumers and background tasks. ``self.bus`` is connected."""

    async def stop(self) -> None:
        """Release what ``start()`` took (before the bus drains)."""

    def checks(self) -> dict[str, bool]:
        """Named readiness checks shown on ``/healthz``; all must be true for 200."""
        return {"nats": bool(self.bus and self.bus.connected)}

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Whether every check passes, and the ``/healthz`` JSON body."""
        checks = self.checks()
        ok = all(checks.values())
        payload = {
            "status": "ok" if ok else "unhealthy",
            "service": self.name,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "checks": checks,
        }
        return ok, payload

    def http_app(self) -> Any | None:
        """An ASGI app to serve on the service's port instead of the small health server.

        Called once, before the bus connects (so the app must look ``self.bus`` up per request).
        The app must answer ``GET /healthz`` (``health()``) and ``GET /metrics``
        (``metrics_body()``) itself. ``None`` (the default) keeps the small health server.
        """
        return None

    def timed(self, handler_name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        """Wrap a handler to count outcomes and latencies in ``/metrics``."""

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            outcome = "ok"
            try:
                return await fn(*args, **kwargs)
            except Exception:
                outcome = "error"
                raise
            finally:
                HANDLED.labels(self.name, handler_name, outcome).inc()
                LATENCY.labels(self.name, handler_name).observe(time.perf_counter() - t0)

        return wrapper


class HealthServer:
    """``GET /healthz`` (JSON, 200 or 503) and ``GET /metrics`` (Prometheus text)."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 0) -> None:
        self.service = service
        self.host = host
        self.port = port
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            path = request.split(b" ", 2)[1].decode() if request.count(b" ") >= 2 else "/"
            if path.startswith("/metrics"):
                status, ctype, body = 200, CONTENT_TYPE_LATEST, generate_latest()
            elif path.startswith("/healthz") or path == "/":
                ok, payload = self.service.health()
                status, ctype, body = (200 if ok else 503), "application/json", json.dumps(payload).encode()
            else:
                status, ctype, body = 404, "application/json", b'{"type":"not_found","message":"not found"}'
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


def metrics_body() -> tuple[bytes, str]:
    """This process's Prometheus metrics and their content type (for ``/metrics``)."""
    return generate_latest(), CONTENT_TYPE_LATEST


class AsgiServer:
    """An ASGI app (``Service.http_app()``) served by uvicorn inside the running event loop.

    Same surface as ``HealthServer``: ``start()`` returns the bound port, ``close()`` stops
    accepting, asks open connections to finish and waits up to ``grace`` seconds for them.
    uvicorn is imported here, only by services that have an HTTP app.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, grace: int = 3) -> None:
        import uvicorn

        self.host = host
        self.port = port
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=grace,
        )
        self._server = uvicorn.Server(config)

    async def start(self) -> int:
        if not self._server.config.loaded:
            self._server.config.load()
        self._server.lifespan = self._server.config.lifespan_class(self._server.config)
        await self._server.startup()
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if getattr(self._server, "servers", None):
            self._server.should_exit = True
            await self._server.shutdown()


async def run_service(
    service: Service,
    *,
    health_port: int | None = None,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until SIGTERM/SIGINT (or ``stop`` is set), then drain."""
    s = service.settings
    configure_logging(s.log_level, s.log_format, service=service.name)
    stop = stop or asyncio.Event()
    install_stop_signals(stop)
    port = health_port if health_port is not None else int(os.environ.get("CHOLINE_HEALTH_PORT", "0"))
    app = service.http_app()
    health: HealthServer | AsgiServer = (
        AsgiServer(app, port=port) if app is not None else HealthServer(service, port=port)
    )
    service.http_port = await health.start()
    service.bus = await Bus.connect(
        s.nats_url,
        name=service.name,
        subjects=service.subjects,
        creds=str(s.nats_creds) if s.nats_creds else None,
        token=s.secret("nats_token"),
    )
    await service.bus.ensure_streams()
    await service.start()
    UP.labels(service.name).set(1)
    log.info("%s ready (health on http://127.0.0.1:%d/healthz)", service.name, health.port)
    if ready:
        ready.set()
    await stop.wait()
    log.info("%s stopping: draining", service.name)
    UP.labels(service.name).set(0)
    if service._lag_task:
        service._lag_task.cancel()
    await service.stop()
    await service.bus.drain()
    await health.close()


def main(service_cls: type[Service]) -> None:
    """Entry point body for ``python -m choline_<service>``."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m choline_{service_cls.name}")
    parser.add_argument("--health-port", type=int, default=None, help="port for /healthz and /metrics (0 = any free)")
    args = parser.parse_args()
    asyncio.run(run_service(service_cls(), health_port=args.health_port))
