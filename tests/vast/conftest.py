"""Fixtures for the vast provider and the vast.ai emulator (real HTTP on a free loopback port).

- ``vast_emulator``  an ``EmulatorServer`` (uvicorn in a thread, 127.0.0.1, free port) whose
                     instances are local boxes under this test's tmp folder; at teardown it is
                     stopped and every box process it started must be dead and every box
                     folder gone
- ``vast_provider``   a ``VastProvider`` talking to it through the real ``vastai`` SDK, with
                     short retry pauses
- ``run_key``, ``installation``, ``labels``  as in tests/providers
- ``assert_clean(provider, emulator, labels)``  nothing listed, billing or left on disk

Other test folders (the provisioner's) can use the emulator the same way:
``EmulatorServer(Emulator(dir), KEY).start()`` and ``get_provider("vast", api_key=KEY,
server_url=server.url)``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from vast_emulator import Emulator, EmulatorServer

from choline_provisioner.providers import LABEL_INSTALLATION, LABEL_RUN, localbox
from choline_provisioner.providers.vast import VastProvider
from choline_provisioner.sshclient import KeyPair, ensure_run_key

API_KEY = "vast-test-key-0123456789abcdef"


@pytest.fixture
def run_key(choline_home: Path) -> KeyPair:
    return ensure_run_key("run-test")


@pytest.fixture
def installation() -> str:
    return f"inst-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def labels(installation: str) -> dict[str, str]:
    return {LABEL_INSTALLATION: installation, LABEL_RUN: "run-test"}


@pytest.fixture
def vast_emulator(tmp_path: Path) -> Iterator[EmulatorServer]:
    emulator = Emulator(tmp_path / "vast-boxes", base_python=None)
    server = EmulatorServer(emulator, API_KEY).start()
    try:
        yield server
    finally:
        server.stop()
        deadline = time.monotonic() + 10
        while (
            alive := [p for p in emulator.started_pids if localbox.process_alive(p)]
        ) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive, f"box processes survived the emulator: {alive}"
        assert emulator.leftovers() == [], "box folders survived the emulator"


def make_provider(server: EmulatorServer, **options: object) -> VastProvider:
    options.setdefault("backoff_s", 0.01)
    options.setdefault("max_backoff_s", 0.05)
    return VastProvider(api_key=API_KEY, server_url=server.url, **options)  # type: ignore[arg-type]


@pytest.fixture
async def vast_provider(vast_emulator: EmulatorServer) -> AsyncIterator[VastProvider]:
    provider = make_provider(vast_emulator)
    yield provider
    await provider.close()


async def assert_clean(provider: VastProvider, emulator: Emulator, labels: dict[str, str]) -> None:
    """Nothing of this installation listed, nothing billing, no box folder left."""
    assert await provider.list_instances({LABEL_INSTALLATION: labels[LABEL_INSTALLATION]}) == []
    assert emulator.billing()["billing_instances"] == []
    assert emulator.leftovers() == []
