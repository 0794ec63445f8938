"""The deploy service and the syncer, real, in the test's event loop (their own NATS prefix, S3 bucket and
SQLite files); bundles pushed through the syncer's model RPCs as ``choline models push`` does."""

from __future__ import annotations

import asyncio
import hashlib
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from choline_core import deploy as c
from choline_core.bus import Bus
from choline_core.embedded import NatsServer, WeedServer
from choline_core.events import Event
from choline_core.rpc import raise_for_error
from choline_core.storage import S3Store
from choline_core.subjects import Subjects
from choline_deploy.main import DeployService
from choline_deploy.settings import DeploySettings
from choline_syncer.main import SyncerService

from ..serve.conftest import digits_bundle, slow_bundle  # noqa: F401  (session fixtures)
from ..syncer.conftest import eventually, running, syncer_settings


@pytest.fixture(scope="session")
def digits_bundle_v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another version of the digits model: the same card, other weights."""
    import sys

    import torch

    import choline
    from choline.bundle import Input, Output

    root = Path(__file__).resolve().parents[2] / "examples" / "digits"
    sys.path.insert(0, str(root))
    try:
        from model import build
    finally:
        sys.path.remove(str(root))
    torch.manual_seed(1)
    b = choline.save_bundle(
        build(128, 0.1),
        tmp_path_factory.mktemp("bundles-v2") / "digits",
        card={
            "name": "digits",
            "purpose": "Recognise a handwritten digit (0-9) in an 8x8 grayscale image.",
            "inputs": [Input("pixels", "float32", [64], range=(0, 16))],
            "outputs": [Output("digit", kind="logits", shape=[10], labels=[str(i) for i in range(10)])],
        },
        factory=build,
        kwargs={"hidden": 128, "dropout": 0.1},
    )
    assert b.tarball is not None
    return b.tarball


@dataclass
class DeployPlane:
    store: S3Store
    subjects: Subjects
    bus: Bus
    deploy: DeployService

    async def rpc(self, service: str, method: str, event: Event, timeout: float = 20) -> Any:
        env = raise_for_error(await self.bus.request(self.subjects.rpc(service, method), event, timeout=timeout))
        return env

    async def push(self, tarball: Path, owner: str = "alice", name: str | None = None) -> c.ModelVersionInfo:
        data = tarball.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        up = (await self.rpc("syncer", c.MODEL_UPLOAD, c.ModelUploadQuery(sha256=sha, size=len(data)))).event(
            c.ModelUpload
        )
        if not up.exists:
            assert up.url is not None
            req = urllib.request.Request(up.url, data=data, method="PUT")
            await asyncio.to_thread(urllib.request.urlopen, req, None, 30)
        reg = c.ModelRegister(key=up.key, owner=owner, sha256=sha, name=name)
        return (await self.rpc("syncer", c.MODEL_REGISTER, reg, timeout=60)).event(c.ModelVersionInfo)

    async def deploy_model(self, model: str, version: int | None = None, owner: str = "alice", **config: Any) -> Any:
        req = c.DeployRequest(model=model, version=version, owner=owner, config=c.DeployConfig(**config))
        return (await self.rpc("deploy", c.DEPLOY_CREATE, req)).event(c.DeploymentInfo)

    async def deployment(self, name: str, owner: str = "alice") -> c.DeploymentInfo | None:
        found = (await self.rpc("deploy", c.DEPLOYMENTS, c.DeploymentsQuery(owner=owner, name=name))).event(
            c.DeploymentList
        )
        return found.deployments[0] if found.deployments else None

    async def wait_state(self, name: str, state: str, version: int | None = None, timeout: float = 90) -> Any:
        async def check() -> Any:
            d = await self.deployment(name)
            if d is not None and d.state == "failed" and state != "failed":
                raise AssertionError(f"deployment failed: {d.reason}")
            ok = d is not None and d.state == state and (version is None or d.version == version)
            ok = ok and (state != "ready" or all(r.state == "ready" for r in d.replicas))  # type: ignore[union-attr]
            return d if ok else None

        return await eventually(check, timeout=timeout, what=f"{name} {state}")

    async def route(self, name: str, owner: str = "alice") -> c.Route:
        return (await self.rpc("deploy", c.ROUTE, c.RouteQuery(name=name, owner=owner))).event(c.Route)


@pytest.fixture
async def dplane(
    nats_server: NatsServer,
    s3_server: WeedServer,
    store: S3Store,
    subjects: Subjects,
    bus: Bus,
    tmp_path: Path,
) -> AsyncIterator[DeployPlane]:
    syncer = SyncerService(syncer_settings(nats_server, s3_server, store, subjects, f"sqlite:///{tmp_path}/syncer.db"))
    settings = DeploySettings(
        nats_url=nats_server.url,
        subject_prefix=subjects.prefix,
        s3_endpoint=s3_server.endpoint,
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
        s3_bucket=store.bucket,
        database_url=f"sqlite:///{tmp_path}/deploy.db",
        log_level="WARNING",
        deploy_check_interval_s=0.3,
        deploy_switch_grace_s=1.0,
        deploy_ready_timeout_s=120,
    )
    deploy = DeployService(settings)
    async with running(syncer), running(deploy):  # type: ignore[arg-type]
        yield DeployPlane(store, subjects, bus, deploy)
        # whatever a test left deployed is undeployed, so no serving process outlives it
        found = (await DeployPlane(store, subjects, bus, deploy).rpc(
            "deploy", c.DEPLOYMENTS, c.DeploymentsQuery()
        )).event(c.DeploymentList)  # fmt: skip
        for d in found.deployments:
            await DeployPlane(store, subjects, bus, deploy).rpc(
                "deploy", c.UNDEPLOY, c.UndeployRequest(name=d.name, owner=d.owner), timeout=60
            )
