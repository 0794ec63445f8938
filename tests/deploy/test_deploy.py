"""The deploy service with real serving processes: deploy -> predict equals the bundle in process; a killed
serving process comes back; a new version and a rollback switch without a failed request; undeploy leaves
no process behind. The syncer registers the pushed bundles (and a successful run's)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import choline
from choline_core import deploy as c
from choline_core.errors import NotFound
from choline_core.events import Envelope
from choline_deploy.local import pid_alive

from ..syncer.conftest import eventually
from .conftest import DeployPlane

pytestmark = pytest.mark.slow

X = [float((i * 7) % 17) for i in range(64)]


async def predict(url: str, pixels: list[float] = X) -> list[float]:
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{url}/predict", json={"pixels": pixels})
        assert r.status_code == 200, r.text
        return r.json()["digit"]["value"]  # type: ignore[no-any-return]


async def changes(plane: DeployPlane) -> list[dict[str, Any]]:
    sub = plane.subjects.deploy(c.CHANGED)
    js = plane.bus.js
    psub = await js.pull_subscribe(sub, durable=None, stream=plane.subjects.stream_for(sub))
    out = []
    try:
        info = await psub.consumer_info()
        if info.num_pending:
            for m in await psub.fetch(info.num_pending, timeout=5):
                out.append(Envelope.parse(m.data).data)
                await m.ack()
    finally:
        await psub.unsubscribe()
    return out


async def test_deploy_predict_equals_in_process_and_undeploy_releases_everything(
    dplane: DeployPlane, digits_bundle: Path
) -> None:
    v1 = await dplane.push(digits_bundle)
    assert (v1.name, v1.version, v1.owner) == ("digits", 1, "alice")
    assert v1.card["inputs"][0]["name"] == "pixels" and v1.key == "models/alice/digits/1/digits.choline-bundle.tar.gz"
    again = await dplane.push(digits_bundle)  # the same bytes: the same version
    assert again.version == 1
    info = await dplane.deploy_model("digits", max_wait_ms=0)
    assert info.state == "deploying" and info.version == 1
    d = await dplane.wait_state("digits", "ready")
    (replica,) = d.replicas
    assert replica.url and replica.url.startswith("http://127.0.0.1:") and pid_alive(replica.pid)
    route = await dplane.route("digits")
    assert route.urls == [replica.url] and route.version == 1

    want = choline.load_bundle(digits_bundle).predict(torch.tensor([X]))[0]
    assert torch.equal(torch.tensor(await predict(replica.url), dtype=torch.float32), want)

    events = await changes(dplane)
    assert [e["state"] for e in events if e["name"] == "digits"][:2] == ["deploying", "ready"]
    ready = next(e for e in events if e["state"] == "ready")
    assert ready["owner"] == "alice" and ready["url"] == replica.url and ready["version"] == "1"

    with pytest.raises(NotFound):  # another owner does not see it
        await dplane.rpc("deploy", c.ROUTE, c.RouteQuery(name="digits", owner="bob"))

    folder = dplane.deploy.settings.path("deploy", "replicas", replica.replica_id)
    assert (folder / "serve.log").exists()
    gone = (await dplane.rpc("deploy", c.UNDEPLOY, c.UndeployRequest(name="digits", owner="alice"), 60)).event(
        c.DeploymentInfo
    )
    assert gone.state == "removed"
    assert not pid_alive(replica.pid)
    assert not folder.exists()
    assert await dplane.deployment("digits") is None
    with pytest.raises(NotFound):
        await dplane.route("digits")
    with pytest.raises(httpx.ConnectError):
        await predict(replica.url)
    assert [e["state"] for e in await changes(dplane)][-1] == "removed"


async def test_a_killed_serving_process_is_started_again(dplane: DeployPlane, digits_bundle: Path) -> None:
    await dplane.push(digits_bundle)
    await dplane.deploy_model("digits", replicas=2)
    d = await dplane.wait_state("digits", "ready")
    assert len(d.replicas) == 2 and len((await dplane.route("digits")).urls) == 2
    old, other = d.replicas
    os.kill(old.pid, signal.SIGKILL)  # type: ignore[arg-type]

    async def serving_without_it() -> Any:
        route = await dplane.route("digits")
        return route if route.urls == [other.url] else None

    await eventually(serving_without_it, timeout=30, what="the route without the dead replica")

    async def restored() -> Any:
        d = await dplane.deployment("digits")
        r = next((r for r in d.replicas if r.replica_id == old.replica_id), None) if d else None
        return d if r and r.restarts == 1 and r.state == "ready" and d.state == "ready" else None  # type: ignore[union-attr]

    d = await eventually(restored, timeout=90, what="the replica restarted")
    new = next(r for r in d.replicas if r.replica_id == old.replica_id)
    assert new.pid != old.pid and pid_alive(new.pid) and "exited" in (d.reason or "")
    assert next(r for r in d.replicas if r.replica_id == other.replica_id).pid == other.pid  # left alone
    assert len(await predict(new.url)) == 10  # type: ignore[arg-type]
    assert sorted((await dplane.route("digits")).urls) == sorted([new.url, other.url])  # type: ignore[type-var]
    states = [e["state"] for e in await changes(dplane)]
    assert "degraded" in states and states[-1] == "ready"


async def test_new_version_and_rollback_switch_without_a_failed_request(
    dplane: DeployPlane, digits_bundle: Path, digits_bundle_v2: Path
) -> None:
    await dplane.push(digits_bundle)
    v2 = await dplane.push(digits_bundle_v2)
    assert v2.version == 2
    want = {
        1: choline.load_bundle(digits_bundle).predict(torch.tensor([X]))[0],
        2: choline.load_bundle(digits_bundle_v2).predict(torch.tensor([X]))[0],
    }
    await dplane.deploy_model("digits", version=1)
    await dplane.wait_state("digits", "ready", version=1)

    seen: list[int] = []
    failures: list[str] = []
    stop = asyncio.Event()

    per_client: dict[int, list[int]] = {}

    async def client(k: int) -> None:
        """What the gateway's proxy does: the route, cached a moment; a refused connection asks again."""
        urls: list[str] = []
        fetched = 0.0
        async with httpx.AsyncClient(timeout=30) as http:
            while not stop.is_set():
                if not urls or time.monotonic() - fetched > 0.5:
                    urls, fetched = (await dplane.route("digits")).urls, time.monotonic()
                try:
                    r = await http.post(f"{urls[0]}/predict", json={"pixels": X})
                except httpx.ConnectError:
                    urls = []
                    continue
                if r.status_code != 200:
                    failures.append(r.text)
                    continue
                got = torch.tensor(r.json()["digit"]["value"], dtype=torch.float32)
                # batched with the other clients' requests: the last bit may differ, the version may not
                match = [v for v, w in want.items() if torch.allclose(got, w, rtol=1e-5, atol=1e-6)]
                if len(match) != 1:
                    failures.append(f"an answer of neither version: {got}")
                    continue
                seen.append(match[0])
                per_client.setdefault(k, []).append(match[0])

    async def only(version: int) -> bool:
        cur = await dplane.deployment("digits")
        return cur is not None and cur.state == "ready" and [r.version for r in cur.replicas] == [version]

    async def served(version: int) -> None:
        n = len(seen)
        await eventually(lambda: len(seen) > n + 10 and seen[-1] == version, timeout=30, what=f"answers of v{version}")

    clients = [asyncio.create_task(client(k)) for k in range(4)]
    try:
        await served(1)
        up = await dplane.deploy_model("digits")  # the newest: version 2, beside version 1 until it is ready
        assert up.version == 2 and up.previous_version == 1
        await eventually(lambda: only(2), timeout=90, what="version 2 alone")
        await served(2)
        back = (await dplane.rpc("deploy", c.ROLLBACK, c.RollbackRequest(name="digits", owner="alice"))).event(
            c.DeploymentInfo
        )
        assert back.version == 1 and back.previous_version == 2
        await eventually(lambda: only(1), timeout=90, what="version 1 alone again")
        await served(1)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert failures == []
    for answers in per_client.values():  # each client: 1 -> 2 -> 1, switching once its cached route expires
        switches = [v for i, v in enumerate(answers) if i == 0 or answers[i - 1] != v]
        assert switches == [1, 2, 1], switches
    with pytest.raises(NotFound):
        await dplane.rpc("deploy", c.ROLLBACK, c.RollbackRequest(name="nothing", owner="alice"))
