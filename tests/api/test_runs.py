"""Runs through the gateway: create (RunRequested on JetStream), get/list over RPC to the
provisioner with the gateway's own record as fallback, control commands, the RPCs to the
syncer, and the shared error body for every failure."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import datetime, timezone
from typing import Any

import httpx

from choline_api.main import ApiService
from choline_core import pipeline, rpc
from choline_core.bus import Bus
from choline_core.errors import NoCapacity
from choline_core.events import ControlAction, ControlCommand, Envelope, RunRequested, RunState, RunStateChanged

from .conftest import StandInProvisioner, StandInSyncer, eventually


async def read_back(bus: Bus, subject: str, n: int = 1) -> list[Envelope]:
    """Every message on ``subject`` so far, read back from JetStream by a fresh consumer."""
    got: list[Envelope] = []

    async def handler(env: Envelope) -> None:
        got.append(env)

    consumer = await bus.consume(f"reader-{uuid.uuid4().hex[:6]}", subject, handler)
    try:
        await eventually(lambda: len(got) >= n, timeout=5)
        await asyncio.sleep(0.1)  # and nothing more arrives
    finally:
        await consumer.stop()
    return got


def assert_error(resp: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"type", "message", "detail"} and body["type"] == kind and body["message"], body
    return dict(body)


async def test_create_publishes_run_requested(api: ApiService, http: httpx.AsyncClient, bus: Bus) -> None:
    spec = {"script": "train.py", "args": ["--epochs", "3"], "gpus": "4x3090", "provider": "vast", "name": "digits"}
    resp = await http.post("/v1/runs", json=spec)
    assert resp.status_code == 202
    run = resp.json()
    assert re.fullmatch(r"r[a-z2-7]{10}", run["run_id"])
    assert run["state"] == "queued" and run["owner"] == "admin" and run["spec"]["gpus"] == "4x3090"

    [env] = await read_back(bus, bus.subjects.provision("requests"))
    req = env.event(RunRequested)
    assert (req.run_id, req.owner, req.spec.script, req.spec.args) == (
        run["run_id"],
        "admin",
        "train.py",
        ["--epochs", "3"],
    )
    assert env.id == f"run-requested-{run['run_id']}"  # a republish is deduplicated by JetStream
    assert env.ts.isoformat().replace("+00:00", "Z") == run["created_at"]  # the run's creation time

    # the provisioner has not seen it yet (no one answers as the provisioner... but the record is there)
    provisioner = await StandInProvisioner(bus).start(learn=False)
    got = await http.get(f"/v1/runs/{run['run_id']}")
    assert got.status_code == 200 and got.json()["state"] == "queued" and got.json()["name"] == "digits"
    listed = (await http.get("/v1/runs")).json()["runs"]
    assert [r["run_id"] for r in listed] == [run["run_id"]]
    assert provisioner.queries, "the gateway asked the provisioner first"


async def test_an_idempotency_key_queues_once(api: ApiService, http: httpx.AsyncClient, bus: Bus) -> None:
    headers = {"Idempotency-Key": "launch-42"}
    first = (await http.post("/v1/runs", json={"script": "a.py"}, headers=headers)).json()
    second = (await http.post("/v1/runs", json={"script": "a.py"}, headers=headers)).json()
    assert first["run_id"] == second["run_id"]
    assert len(await read_back(bus, bus.subjects.provision("requests"))) == 1


async def test_bad_input_gets_the_shared_error_body(api: ApiService, http: httpx.AsyncClient, bus: Bus) -> None:
    body = assert_error(await http.post("/v1/runs", json={"script": "t.py", "gpus": "4xbanana"}), 400, "bad_spec")
    assert "accepted forms" in body["message"]
    body = assert_error(await http.post("/v1/runs", json={"script": "t.py", "provider": "aws"}), 400, "bad_spec")
    assert "local, ssh, vast" in body["message"]
    assert_error(await http.post("/v1/runs", json={"script": "t.py", "max_price": -1}), 400, "bad_spec")
    body = assert_error(await http.post("/v1/runs", json={"script": "t.py", "gpus": 4}), 422, "validation_error")
    assert body["detail"][0]["loc"] == ["body", "gpus"]
    assert_error(await http.post("/v1/runs", json={"scrip": "t.py"}), 422, "validation_error")
    assert_error(
        await http.post("/v1/runs", content=b"{not json", headers={"content-type": "application/json"}),
        422,
        "validation_error",
    )
    assert_error(await http.post("/v1/runs", json={"script": "x" * 2_000_000}), 413, "too_large")
    assert_error(await http.get("/v1/runs", params={"limit": 0}), 422, "validation_error")
    assert_error(await http.get("/v1/runs", params={"state": "dancing"}), 422, "validation_error")
    assert_error(await http.get("/v1/nowhere"), 404, "not_found")
    assert_error(await http.put("/v1/runs"), 405, "method_not_allowed")
    # nothing was queued by any of it
    got: list[Envelope] = []
    consumer = await bus.consume("peek", bus.subjects.provision("requests"), lambda e: _append(got, e))
    await asyncio.sleep(0.3)
    await consumer.stop()
    assert got == []


async def _append(into: list[Envelope], env: Envelope) -> None:
    into.append(env)


async def test_unknown_runs_are_404_with_the_body(
    api: ApiService, http: httpx.AsyncClient, provisioner: StandInProvisioner
) -> None:
    for path in (
        "/v1/runs/rnope000000",
        "/v1/runs/r.bad.id",
        "/v1/runs/rnope000000/logs",
        "/v1/runs/rnope000000/metrics",
    ):
        body = assert_error(await http.get(path), 404, "not_found")
        assert "no run" in body["message"]
    assert_error(await http.post("/v1/runs/rnope000000/control", json={"action": "pause"}), 404, "not_found")


async def test_list_filters_and_pages_through_the_provisioner(
    api: ApiService, http: httpx.AsyncClient, provisioner: StandInProvisioner
) -> None:
    ids = []
    for i in range(5):
        ids.append((await http.post("/v1/runs", json={"script": "t.py", "name": f"sweep-{i}"})).json()["run_id"])
    await eventually(lambda: len(provisioner.runs) == 5)
    await provisioner.set_state(ids[0], RunState.running)

    running = (await http.get("/v1/runs", params={"state": "running"})).json()["runs"]
    assert [r["run_id"] for r in running] == [ids[0]]
    named = (await http.get("/v1/runs", params={"name": "sweep-3"})).json()["runs"]
    assert [r["run_id"] for r in named] == [ids[3]]

    seen: list[str] = []
    params: dict[str, Any] = {"limit": 2}
    while True:
        page = (await http.get("/v1/runs", params=params)).json()
        seen += [r["run_id"] for r in page["runs"]]
        if not page["next_before"]:
            break
        params["before"] = page["next_before"]
    assert seen == list(reversed(ids))


async def test_control_commands_go_to_the_run_control_subject(
    api: ApiService, http: httpx.AsyncClient, bus: Bus, provisioner: StandInProvisioner
) -> None:
    run_id = (await http.post("/v1/runs", json={"script": "t.py"})).json()["run_id"]
    await eventually(lambda: run_id in provisioner.runs)
    await provisioner.set_state(run_id, RunState.running)

    sent = await http.post(f"/v1/runs/{run_id}/control", json={"action": "set", "params": {"lr": 3e-4, "epochs": "+5"}})
    assert sent.status_code == 202
    await http.post(f"/v1/runs/{run_id}/control", json={"action": "pause"})
    commands = [e.event(ControlCommand) for e in await read_back(bus, bus.subjects.run_control(run_id), n=2)]
    assert [(c.action, c.params, c.by) for c in commands] == [
        (ControlAction.set, {"lr": 3e-4, "epochs": "+5"}, "admin"),
        (ControlAction.pause, {}, "admin"),
    ]
    assert sent.json()["command_id"]

    assert_error(await http.post(f"/v1/runs/{run_id}/control", json={"action": "set"}), 400, "bad_spec")
    assert_error(await http.post(f"/v1/runs/{run_id}/control", json={"action": "explode"}), 422, "validation_error")
    await provisioner.set_state(run_id, RunState.succeeded)
    body = assert_error(await http.post(f"/v1/runs/{run_id}/control", json={"action": "stop"}), 409, "conflict")
    assert "succeeded" in body["message"]


async def test_provisioner_errors_and_absence_map_to_the_body(
    api: ApiService, http: httpx.AsyncClient, bus: Bus
) -> None:
    # nobody answers as the provisioner: 503, saying who is missing
    body = assert_error(await http.get("/v1/offers", params={"gpus": "1xcpu"}), 503, "bus_error")
    assert "provisioner" in body["message"]
    assert_error(await http.get("/v1/runs"), 503, "bus_error")

    provisioner = await StandInProvisioner(bus).start(learn=False)
    provisioner.fail_with[rpc.OFFERS] = NoCapacity("no 4x3090 under $0.10/h", hint="raise --max-price")
    body = assert_error(await http.get("/v1/offers", params={"gpus": "4x3090", "max_price": 0.1}), 503, "no_capacity")
    assert body["message"] == "no 4x3090 under $0.10/h (raise --max-price)"
    # bad input never reaches the provisioner
    n = len(provisioner.queries)
    assert_error(await http.get("/v1/offers", params={"gpus": "4xbanana"}), 400, "bad_spec")
    assert_error(await http.get("/v1/offers", params={"gpus": "1xcpu", "provider": "gcp"}), 400, "bad_spec")
    assert_error(await http.get("/v1/offers"), 422, "validation_error")
    assert len(provisioner.queries) == n


async def test_offers_and_boxes_over_rpc(
    api: ApiService, http: httpx.AsyncClient, provisioner: StandInProvisioner
) -> None:
    offers = (await http.get("/v1/offers", params={"gpus": "cpu", "provider": "local"})).json()["offers"]
    assert offers == provisioner.offers
    provisioner.boxes = [
        {"box_id": "b1", "owner": "admin", "state": "ready"},
        {"box_id": "b2", "owner": "alice", "state": "ready"},
    ]
    assert [b["box_id"] for b in (await http.get("/v1/boxes")).json()["boxes"]] == ["b1", "b2"]
    made = (await http.post("/v1/tokens", json={"name": "a", "user": "alice"})).json()
    alice = await http.get("/v1/boxes", headers={"Authorization": f"Bearer {made['token']}"})
    assert [b["box_id"] for b in alice.json()["boxes"]] == ["b2"]


async def test_checkpoints_artifacts_and_code_over_rpc_to_the_syncer(
    api: ApiService, http: httpx.AsyncClient, provisioner: StandInProvisioner, syncer: StandInSyncer
) -> None:
    run_id = (await http.post("/v1/runs", json={"script": "t.py"})).json()["run_id"]
    prefix = f"runs/{run_id}/attempts/1/checkpoints"
    syncer.checkpoints[run_id] = [
        pipeline.CheckpointInfo(
            run_id=run_id, attempt=1, step=100, prefix=f"{prefix}/100", deleted_at=datetime.now(timezone.utc)
        ),
        pipeline.CheckpointInfo(run_id=run_id, attempt=1, step=200, prefix=f"{prefix}/200", files=3, size=42),
        pipeline.CheckpointInfo(run_id=run_id, attempt=2, step=300, prefix=f"{prefix}/300", reason="pause"),
    ]
    cps = (await http.get(f"/v1/runs/{run_id}/checkpoints")).json()
    assert [c["step"] for c in cps["checkpoints"]] == [300, 200]  # newest first, deleted ones hidden
    cps = (await http.get(f"/v1/runs/{run_id}/checkpoints", params={"include_deleted": "true"})).json()
    assert [c["step"] for c in cps["checkpoints"]] == [300, 200, 100]

    def artifact(path: str) -> pipeline.ArtifactInfo:
        return pipeline.ArtifactInfo(
            path=path,
            key=f"runs/{run_id}/artifacts/{path}",
            size=5,
            sha256="0" * 64,
            attempt=1,
            url=f"http://s3/{path}",
        )

    syncer.artifacts[run_id] = pipeline.ArtifactList(
        run_id=run_id,
        artifacts=[artifact("out/model.pt"), artifact("bundle.tar.gz")],
        bundle="bundle.tar.gz",
        logs=[pipeline.LogInfo(attempt=1, key=f"runs/{run_id}/logs/attempt-1.txt", size=9, url="http://s3/log")],
    )
    arts = (await http.get(f"/v1/runs/{run_id}/artifacts")).json()
    assert [f["path"] for f in arts["files"]] == ["out/model.pt"]
    assert arts["bundle"]["path"] == "bundle.tar.gz" and arts["bundle"]["url"] == "http://s3/bundle.tar.gz"
    assert "key" not in arts["files"][0]  # object keys stay inside
    assert arts["logs"][0]["attempt"] == 1

    digest = "ab" * 32
    first = (await http.post("/v1/code", json={"digest": digest})).json()
    assert first["exists"] is False and first["url"] and first["key"] == f"code/{digest}.tar.gz"
    syncer.stored.add(first["key"])
    assert (await http.post("/v1/code", json={"digest": digest})).json() == {
        "digest": digest,
        "kind": "code",
        "key": f"code/{digest}.tar.gz",
        "exists": True,
        "url": None,
    }
    env = (await http.post("/v1/code", json={"digest": digest, "kind": "env"})).json()
    assert env["key"] == f"envs/{digest}.json"
    assert_error(await http.post("/v1/code", json={"digest": "../../etc"}), 422, "validation_error")


async def test_control_is_queued_while_the_provisioner_is_away(
    api: ApiService, http: httpx.AsyncClient, bus: Bus
) -> None:
    run_id = (await http.post("/v1/runs", json={"script": "t.py"})).json()["run_id"]
    sent = await http.post(f"/v1/runs/{run_id}/control", json={"action": "pause"})
    assert sent.status_code == 202
    [env] = await read_back(bus, bus.subjects.run_control(run_id))
    assert env.event(ControlCommand).action == ControlAction.pause
    # a run nobody queued here cannot be steered blind
    assert_error(await http.post("/v1/runs/rnope000000/control", json={"action": "pause"}), 503, "bus_error")


async def test_a_run_event_naming_another_run_changes_nothing(
    api: ApiService, http: httpx.AsyncClient, bus: Bus
) -> None:
    mine = (await http.post("/v1/runs", json={"script": "t.py"})).json()["run_id"]
    other = (await http.post("/v1/runs", json={"script": "t.py"})).json()["run_id"]
    forged = RunStateChanged(run_id=other, state=RunState.failed).envelope()
    await bus.publish(bus.subjects.run_events(mine), forged)  # on mine's subject, about the other run
    await bus.publish(bus.subjects.run_events(mine), RunStateChanged(run_id=mine, state=RunState.running))
    await eventually(lambda: api.store.run_state(mine)[0] == RunState.running)  # type: ignore[union-attr]
    assert api.store.run_state(other) == (None, None)  # type: ignore[union-attr]
