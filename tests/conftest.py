"""Shared fixtures: real servers on free ports, fresh names per test, a temporary CHOLINE_HOME.

- ``nats_server``  one nats-server with JetStream per test session (``nats_server_fresh`` for
  tests that restart or kill it)
- ``s3_server``    one ``weed mini`` S3 server per test session
- ``subjects``/``bus``  a fresh subject prefix (so fresh streams) per test, connected bus
- ``store``        a fresh bucket per test on the session's S3 server
- ``sqlite_url``/``pg_url``  a temporary SQLite file; PostgreSQL on 127.0.0.1:5432 (``test``)
  in a fresh schema-prefix, skipped with the reason when PostgreSQL is absent
- every test gets its own ``CHOLINE_HOME`` (autouse) so nothing touches ~/.choline
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from choline_core.bus import Bus
from choline_core.embedded import NatsServer, WeedServer
from choline_core.storage import S3Store
from choline_core.subjects import Subjects

PG_URL = os.environ.get("CHOLINE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SLOW_LIST = Path(__file__).parent / "slow_tests.txt"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests listed in ``tests/slow_tests.txt`` (measured by ``make mark-slow``) are ``slow`` too."""
    if not SLOW_LIST.exists():
        return
    listed = {line.strip() for line in SLOW_LIST.read_text().splitlines() if line.strip() and not line.startswith("#")}
    for item in items:
        if item.nodeid in listed:
            item.add_marker(pytest.mark.slow)


def short_id() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(autouse=True)
def choline_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "choline-home"
    home.mkdir()
    monkeypatch.setenv("CHOLINE_HOME", str(home))
    for var in list(os.environ):
        if var.startswith("CHOLINE_") and var not in ("CHOLINE_HOME", "CHOLINE_TEST_PG_URL"):
            monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats_server_fresh(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server of this test's own, free to restart or kill."""
    server = NatsServer(tmp_path / "nats-own")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedServer]:
    server = WeedServer(tmp_path_factory.mktemp("s3"), access_key="choline-test", secret_key=secrets.token_urlsafe(24))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def subjects() -> Subjects:
    return Subjects(prefix=f"t{short_id()}")


@pytest.fixture
async def bus(nats_server: NatsServer, subjects: Subjects) -> AsyncIterator[Bus]:
    b = await Bus.connect(nats_server.url, name="test", subjects=subjects, reconnect="fail-fast")
    await b.ensure_streams()
    yield b
    await b.delete_streams()
    await b.close()


@pytest.fixture
def store(s3_server: WeedServer) -> Iterator[S3Store]:
    s = S3Store(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, bucket=f"t-{short_id()}")
    s.ensure_bucket()
    yield s
    s.delete_prefix("")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'test.sqlite'}"


def _pg_reachable() -> str | None:
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed"
    dsn = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    try:
        with psycopg.connect(dsn, connect_timeout=2):
            return None
    except Exception as exc:
        return f"PostgreSQL is not reachable at {dsn}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


@pytest.fixture(scope="session")
def pg_available() -> str | None:
    return _pg_reachable()


@pytest.fixture
def pg_url(pg_available: str | None) -> str:
    if pg_available:
        pytest.skip(pg_available)
    return PG_URL
