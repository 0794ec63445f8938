"""Fixtures for the monitor's tests: its settings against the test's own NATS prefix and database,
and a helper that runs the real service (``run_service``) in the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from choline_core.embedded import NatsServer
from choline_core.subjects import Subjects
from choline_monitor.main import MonitorService, MonitorSettings
from choline_svc.service import run_service


@pytest.fixture
def monitor_settings(nats_server: NatsServer, subjects: Subjects, sqlite_url: str) -> MonitorSettings:
    return MonitorSettings(
        nats_url=nats_server.url,
        subject_prefix=subjects.prefix,
        database_url=sqlite_url,
        monitor_sweep_s=0.3,
        log_level="WARNING",
    )


@contextlib.asynccontextmanager
async def running(service: MonitorService, timeout: float = 30.0) -> AsyncIterator[MonitorService]:
    """The service between ready and a drained stop, as ``python -m choline_monitor`` runs it."""
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_service(service, health_port=0, ready=ready, stop=stop))
    waiter = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiter.cancel()
        task.result()  # raises what stopped it
        raise AssertionError("the monitor service exited before it was ready")
    if waiter not in done:
        task.cancel()
        raise AssertionError("the monitor service was not ready in time")
    try:
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout)


async def eventually(check: Callable[[], Any | Awaitable[Any]], timeout: float = 15.0, what: str = "") -> Any:
    """Poll ``check`` until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.05)
