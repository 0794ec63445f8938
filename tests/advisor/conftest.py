"""Fixtures for the advisor's tests: the OpenAI-compatible test server on loopback, the monitor's
settings pointed at it, a code bundle in real object storage, and a stand-in provisioner that
answers ``get_run`` on the real bus (the monitor only ever asks it over NATS)."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone

import pytest
from pydantic import SecretStr

from choline_core import rpc
from choline_core.bus import Bus
from choline_core.embedded import NatsServer, WeedServer
from choline_core.events import Envelope
from choline_core.pipeline import code_key
from choline_core.storage import S3Store
from choline_core.subjects import Subjects
from choline_monitor.main import MonitorSettings

from .llm_server import LlmServer
from .material import SECRETS, run_info, script

API_KEY = "sk-test-advisor-key-0123456789ABCDEFghij"


@pytest.fixture(scope="module")
def llm_module() -> Iterator[LlmServer]:
    with LlmServer() as server:
        yield server


@pytest.fixture
def llm(llm_module: LlmServer) -> Iterator[LlmServer]:
    llm_module.reset()
    yield llm_module
    llm_module.reset()


@pytest.fixture
def advisor_settings(
    nats_server: NatsServer, s3_server: WeedServer, subjects: Subjects, sqlite_url: str, store: S3Store, llm: LlmServer
) -> MonitorSettings:
    return MonitorSettings(
        nats_url=nats_server.url,
        subject_prefix=subjects.prefix,
        database_url=sqlite_url,
        s3_endpoint=store.endpoint,
        s3_access_key=SecretStr(s3_server.access_key),
        s3_secret_key=SecretStr(s3_server.secret_key),
        s3_bucket=store.bucket,
        monitor_sweep_s=0.3,
        log_level="WARNING",
        llm_base_url=llm.url,
        llm_model="test-model",
        llm_api_key=SecretStr(API_KEY),
        llm_timeout_s=3.0,
        monitor_pause_max_age_s=3600.0,
    )


def code_bundle(files: dict[str, str]) -> tuple[bytes, str]:
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:  # type: ignore[arg-type]
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = raw.getvalue()
    return data, hashlib.sha256(data).hexdigest()


@pytest.fixture
def uploaded_code(store: S3Store) -> str:
    data, digest = code_bundle({"train.py": script(), "README.md": f"token {SECRETS['log']}\n"})
    store.put_bytes(code_key(digest), data)
    return digest


@pytest.fixture
async def provisioner(bus: Bus, uploaded_code: str) -> AsyncIterator[dict[str, rpc.RunInfo]]:
    """A stand-in for the provisioner's ``get_run``: runs put in the returned dict are known."""
    runs: dict[str, rpc.RunInfo] = {}

    async def get_run(env: Envelope) -> rpc.RunInfo:
        from choline_core.errors import NotFound

        q = env.event(rpc.RunQuery)
        if q.run_id not in runs:
            raise NotFound(f"no run {q.run_id}")
        return runs[q.run_id]

    await bus.serve(bus.subjects.rpc(rpc.PROVISIONER, rpc.GET_RUN), get_run, queue="provisioner")
    yield runs


def known_run(runs: dict[str, rpc.RunInfo], run_id: str, code_digest: str) -> rpc.RunInfo:
    info = run_info(run_id)
    spec = info.spec.model_copy(update={"code_digest": code_digest, "data": []})
    info = info.model_copy(update={"spec": spec, "updated_at": datetime.now(timezone.utc)})
    runs[run_id] = info
    return info
