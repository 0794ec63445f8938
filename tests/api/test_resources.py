"""The rest of a run over REST: attempts (the provisioner's), findings (the real monitor service's
RPC), chart series and live metrics, stream tokens for browsers; and one user never reaching
another's run through any of them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import Session

from choline_api.main import DURABLE_METRICS, ApiService
from choline_core import rpc
from choline_core.bus import Bus
from choline_core.embedded import NatsServer
from choline_core.events import AttemptStarted, MetricBatch, MetricPoint, RunState
from choline_core.subjects import Subjects
from choline_monitor.main import MonitorService, MonitorSettings
from choline_monitor.models import FindingRow
from choline_svc.service import run_service

from .conftest import StandInProvisioner, base_url, eventually, new_user
from .test_logs_metrics import consumer_caught_up

NOW = datetime.now(timezone.utc)


@contextlib.asynccontextmanager
async def monitor_service(nats: NatsServer, subjects: Subjects, home: Path) -> AsyncIterator[MonitorService]:
    svc = MonitorService(MonitorSettings(home=home, nats_url=nats.url, subject_prefix=subjects.prefix))
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_service(svc, health_port=0, ready=ready, stop=stop))
    await asyncio.wait_for(ready.wait(), 30)
    try:
        yield svc
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def add_finding(svc: MonitorService, run_id: str, fid: str, step: int, ts: float, message: str) -> None:
    """A finding as the monitor's detectors record it (its own table, through its own engine)."""
    assert svc.engine is not None
    with Session(svc.engine) as s:
        s.add(
            FindingRow(
                id=fid,
                run_id=run_id,
                attempt=1,
                detector="divergence",
                severity="critical",
                episode=step,
                step=step,
                data_ts=ts,
                message=message,
                evidence=json.dumps({"loss": 12.5}),
                created_at=NOW,
            )
        )
        s.commit()


async def run_of(client: httpx.AsyncClient, provisioner: StandInProvisioner, name: str) -> str:
    run_id = str((await client.post("/v1/runs", json={"script": "train.py", "name": name})).json()["run_id"])
    await eventually(lambda: run_id in provisioner.runs)
    return run_id


async def sse_events(resp: httpx.Response, *, until: str, limit: int = 100) -> list[tuple[str, Any, str | None]]:
    out: list[tuple[str, Any, str | None]] = []
    event, data, ident = "message", [], None
    async for line in resp.aiter_lines():
        if not line:
            if data:
                out.append((event, json.loads("\n".join(data)), ident))
                if event == until or len(out) >= limit:
                    return out
            event, data, ident = "message", [], None
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
        elif field == "id":
            ident = value
    return out


async def test_attempts_and_findings_with_the_real_monitor(
    api: ApiService,
    http: httpx.AsyncClient,
    provisioner: StandInProvisioner,
    nats_server: NatsServer,
    subjects: Subjects,
    choline_home: Path,
) -> None:
    alice, bob = await new_user(http, "alice"), await new_user(http, "bob")
    async with alice, bob, monitor_service(nats_server, subjects, choline_home) as monitor:
        mine, theirs = await run_of(alice, provisioner, "a"), await run_of(bob, provisioner, "b")
        provisioner.runs[mine].attempts = [
            rpc.AttemptInfo(attempt=2, box_id="b2", resumed_from_step=900, cost=0.5),
            rpc.AttemptInfo(attempt=1, box_id="b1", end_reason="box lost", last_step=950, cost=1.25),
        ]
        got = (await alice.get(f"/v1/runs/{mine}/attempts")).json()
        assert [a["attempt"] for a in got["attempts"]] == [1, 2]
        assert got["attempts"][0]["end_reason"] == "box lost" and got["attempts"][1]["resumed_from_step"] == 900

        t = time.time()
        add_finding(monitor, mine, "f-old", 100, t - 60, "loss spiked")
        add_finding(monitor, mine, "f-new", 400, t - 1, "loss diverged")
        add_finding(monitor, theirs, "f-bob", 50, t - 30, "bob's stall")
        page = (await alice.get(f"/v1/runs/{mine}/findings")).json()
        assert [f["id"] for f in page["findings"]] == ["f-new", "f-old"]
        assert page["findings"][0]["evidence"] == {"loss": 12.5} and page["findings"][0]["severity"] == "critical"
        assert [f["id"] for f in (await alice.get("/v1/findings")).json()["findings"]] == ["f-new", "f-old"]
        assert [f["id"] for f in (await bob.get("/v1/findings")).json()["findings"]] == ["f-bob"]
        assert len((await http.get("/v1/findings", params={"limit": 2})).json()["findings"]) == 2
        for path in (f"/v1/runs/{mine}/findings", f"/v1/runs/{mine}/attempts"):
            resp = await bob.get(path)
            assert resp.status_code == 404 and resp.json()["type"] == "not_found", path


async def test_findings_when_the_monitor_is_away(api: ApiService, http: httpx.AsyncClient) -> None:
    resp = await http.get("/v1/findings")
    assert resp.status_code == 503 and resp.json()["type"] == "bus_error"
    assert "monitor" in resp.json()["message"]


async def publish_points(bus: Bus, run_id: str, attempt: int, steps: range, *, seq0: int = 0, spike: int = -1) -> None:
    points = [
        MetricPoint(seq=seq0 + i, step=s, key="train/loss", value=100.0 if s == spike else 1.0 / (s + 1))
        for i, s in enumerate(steps)
    ]
    await bus.publish(bus.subjects.run_metrics(run_id), MetricBatch(run_id=run_id, attempt=attempt, points=points))


async def test_series_and_live_metrics_through_the_gateway(
    api: ApiService, http: httpx.AsyncClient, provisioner: StandInProvisioner, bus: Bus
) -> None:
    run_id = await run_of(http, provisioner, "charts")
    for start in range(0, 20000, 5000):
        await publish_points(bus, run_id, 1, range(start, start + 5000), seq0=start, spike=12345)
    await eventually(lambda: consumer_caught_up(bus, DURABLE_METRICS, "METRICS"))
    series = await http.get(f"/v1/runs/{run_id}/metrics/train/loss/series", params={"max_points": 200})
    assert series.status_code == 200, series.text
    s = series.json()
    assert s["key"] == "train/loss" and len(s["step"]) <= 200 and sum(s["count"]) == 20000
    assert max(s["max"]) == 100.0 and s["source"].startswith("rollup-")
    zoom = (await http.get(f"/v1/runs/{run_id}/metrics/train/loss/series", params={"start": 10, "end": 14})).json()
    assert zoom["step"] == [10, 11, 12, 13, 14] and zoom["resolution"] == 1
    bad = await http.get(f"/v1/runs/{run_id}/metrics/train/loss/series", params={"start": 9, "end": 2})
    assert bad.status_code == 400 and bad.json()["type"] == "bad_spec"
    assert (await http.get(f"/v1/runs/{run_id}/metrics/keys")).json()["keys"] == ["train/loss"]

    # attempt 2 resumes from step 15000: the chart drops attempt 1's later points
    await bus.publish(
        bus.subjects.run_events(run_id), AttemptStarted(run_id=run_id, attempt=2, box_id="b2", resumed_from_step=15000)
    )
    await eventually(lambda: _series_count(http, run_id, 15001), timeout=10)

    # live: after the cursor, new points arrive as events; the run's end ends the stream
    async with http.stream(
        "GET", f"/v1/runs/{run_id}/metrics/follow", params={"after": "1:19999", "key": "train/loss"}
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        reader = asyncio.create_task(sse_events(resp, until="end"))
        await asyncio.sleep(0.3)
        await publish_points(bus, run_id, 2, range(15001, 15011))
        await eventually(lambda: consumer_caught_up(bus, DURABLE_METRICS, "METRICS"))
        await provisioner.set_state(run_id, RunState.succeeded)
        events = await asyncio.wait_for(reader, 15)
    kinds = [e for e, _, _ in events]
    assert kinds[0] in ("attempt", "state") and kinds[-1] == "end"
    pts = [d["points"]["train/loss"] for e, d, _ in events if e == "points"]
    assert [s for p in pts for s in p["step"]] == list(range(15001, 15011))
    assert events[[e for e, _, _ in events].index("points")][2] == "2:9"  # the cursor: attempt 2, seq 9
    assert ("attempt", {"run_id": run_id, "attempt": 2}) in [(e, d) for e, d, _ in events]


async def _series_count(http: httpx.AsyncClient, run_id: str, want: int) -> bool:
    s = (await http.get(f"/v1/runs/{run_id}/metrics/train/loss/series", params={"max_points": 50})).json()
    return int(sum(s["count"])) == want


async def test_stream_tokens_let_a_browser_follow_one_run(
    api: ApiService, http: httpx.AsyncClient, provisioner: StandInProvisioner
) -> None:
    alice = await new_user(http, "alice")
    async with alice, httpx.AsyncClient(base_url=base_url(api), timeout=10) as browser:
        mine, other = await run_of(alice, provisioner, "mine"), await run_of(http, provisioner, "admins")
        made = await alice.post(f"/v1/runs/{mine}/stream-token")
        assert made.status_code == 201
        token = made.json()["token"]
        assert made.json()["logs_url"] == f"/v1/runs/{mine}/logs?follow=1&stream_token={token}"
        await provisioner.set_state(mine, RunState.succeeded)
        async with browser.stream("GET", made.json()["logs_url"]) as resp:
            assert resp.status_code == 200
            events = await asyncio.wait_for(sse_events(resp, until="end"), 10)
        assert events[-1][0] == "end"
        async with browser.stream("GET", made.json()["metrics_url"]) as resp:
            assert resp.status_code == 200
            assert (await asyncio.wait_for(sse_events(resp, until="end"), 10))[-1][0] == "end"
        # not another run, not another endpoint, not a forged or stale one
        for url in (
            f"/v1/runs/{other}/logs?follow=1&stream_token={token}",
            f"/v1/runs/{mine}/logs?follow=1&stream_token={token[:-2]}xx",
            f"/v1/runs/{mine}/logs?follow=1&stream_token=st1.e30.AAAA",
            f"/v1/runs/{mine}/metrics?stream_token={token}",
            f"/v1/runs/{mine}/checkpoints?stream_token={token}",
        ):
            resp = await browser.get(url)
            assert resp.status_code == 401 and resp.json()["type"] == "unauthorized", url
        assert (await alice.post(f"/v1/runs/{other}/stream-token")).status_code == 404
        # revoking the token it came from ends it
        me = (await alice.get("/v1/me")).json()
        await http.delete(f"/v1/tokens/{me['token_id']}")
        resp = await browser.get(f"/v1/runs/{mine}/logs?follow=1&stream_token={token}")
        assert resp.status_code == 401


async def test_a_stream_token_expires(
    nats_server: NatsServer, subjects: Subjects, bus: Bus, choline_home: Path
) -> None:
    from .conftest import api_settings, running

    settings = api_settings(nats_server, subjects, choline_home, api_stream_token_ttl=1)
    async with running(ApiService(settings)) as svc:
        token = json.loads((choline_home / "secrets" / "token.json").read_text())["api_token"]
        async with httpx.AsyncClient(base_url=base_url(svc), headers={"Authorization": f"Bearer {token}"}) as c:
            run_id = str((await c.post("/v1/runs", json={"script": "t.py"})).json()["run_id"])
            st = (await c.post(f"/v1/runs/{run_id}/stream-token")).json()["token"]
            await asyncio.sleep(2.1)
            async with httpx.AsyncClient(base_url=base_url(svc)) as browser:
                resp = await browser.get(f"/v1/runs/{run_id}/logs", params={"stream_token": st})
        assert resp.status_code == 401 and "expired" in resp.json()["message"]


@pytest.mark.parametrize("suffix", ["attempts", "findings", "metrics/loss/series", "metrics/follow", "stream-token"])
async def test_new_run_endpoints_hide_other_users_runs(
    api: ApiService, http: httpx.AsyncClient, provisioner: StandInProvisioner, suffix: str
) -> None:
    alice, bob = await new_user(http, "alice"), await new_user(http, "bob")
    async with alice, bob:
        run_id = await run_of(alice, provisioner, f"a-{uuid.uuid4().hex[:4]}")
        method = "POST" if suffix == "stream-token" else "GET"
        resp = await bob.request(method, f"/v1/runs/{run_id}/{suffix}")
        assert resp.status_code == 404 and resp.json()["type"] == "not_found"
        unknown = await alice.request(method, f"/v1/runs/rnosuchrun00/{suffix}")
        assert unknown.status_code == 404
