"""The logs and metrics store: ingest from the LOGS/METRICS streams (idempotent on (run, attempt,
seq) even when JetStream's dedup window is long gone), range and metric queries, superseded
points, and the server-sent-events follow that ends with the run."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from choline_api.main import DURABLE_LOGS, DURABLE_METRICS, ApiService
from choline_core.bus import Bus
from choline_core.embedded import NatsServer
from choline_core.events import AttemptStarted, LogBatch, LogLine, MetricBatch, MetricPoint, RunState
from choline_core.subjects import Subjects
from choline_svc.db import make_engine, schema_name

from .conftest import StandInProvisioner, api_settings, base_url, eventually, running


async def publish_logs(bus: Bus, run_id: str, attempt: int, seqs: range | list[int], fmt: str = "line {}") -> None:
    """One batch, under a fresh envelope id: to JetStream a replay looks like a new message."""
    lines = [LogLine(seq=s, text=fmt.format(s), stream="stderr" if s % 5 == 4 else "stdout") for s in seqs]
    await bus.publish(bus.subjects.run_logs(run_id), LogBatch(run_id=run_id, attempt=attempt, lines=lines))


async def publish_metrics(bus: Bus, run_id: str, attempt: int, steps: range, key: str = "loss", seq0: int = 0) -> None:
    points = [MetricPoint(seq=seq0 + i, step=step, key=key, value=1.0 / step) for i, step in enumerate(steps)]
    await bus.publish(bus.subjects.run_metrics(run_id), MetricBatch(run_id=run_id, attempt=attempt, points=points))


async def all_lines(http: httpx.AsyncClient, run_id: str, **params: Any) -> list[dict[str, Any]]:
    resp = await http.get(f"/v1/runs/{run_id}/logs", params={"limit": 10000, **params})
    assert resp.status_code == 200, resp.text
    return list(resp.json()["lines"])


async def consumer_caught_up(bus: Bus, durable: str, stream_short: str) -> bool:
    info = await bus.js.consumer_info(bus.subjects.stream_name(stream_short), durable)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def new_run(http: httpx.AsyncClient) -> str:
    return str((await http.post("/v1/runs", json={"script": "train.py"})).json()["run_id"])


@pytest.mark.slow
async def test_log_ingest_is_idempotent_under_replay_and_redelivery(
    nats_server: NatsServer, subjects: Subjects, bus: Bus, choline_home: Path
) -> None:
    settings = api_settings(nats_server, subjects, choline_home)
    token = None
    async with running(ApiService(settings)) as svc:
        token = json.loads((choline_home / "secrets" / "token.json").read_text())["api_token"]
        async with httpx.AsyncClient(base_url=base_url(svc), headers={"Authorization": f"Bearer {token}"}) as http:
            run_id = await new_run(http)
            await publish_logs(bus, run_id, 1, range(5))
            await publish_logs(bus, run_id, 1, range(3, 8), fmt="replayed {}")  # hours later: same keys
            await publish_logs(bus, run_id, 2, range(2))
            # a box publishing under its run's subject but naming another run: dropped
            other = LogBatch(run_id="rsomeoneelse", attempt=1, lines=[LogLine(seq=99, text="sneaky")])
            await bus.publish(bus.subjects.run_logs(run_id), other)
            await bus.nc.publish(bus.subjects.run_logs(run_id), b"not an envelope")  # not even JetStream-acked
            await bus.js.publish(bus.subjects.run_logs(run_id), b"{garbage")
            await eventually(lambda: consumer_caught_up(bus, DURABLE_LOGS, "LOGS"))
            lines = await all_lines(http, run_id)
    keys = [(line["attempt"], line["seq"]) for line in lines]
    assert keys == [(1, s) for s in range(8)] + [(2, 0), (2, 1)]
    assert [line["text"] for line in lines[:5]] == [f"line {s}" for s in range(5)]  # first write wins
    assert lines[4]["stream"] == "stderr"

    # every message delivered again from the start of the stream: nothing changes
    await bus.js.delete_consumer(bus.subjects.stream_name("LOGS"), DURABLE_LOGS)
    async with (
        running(ApiService(settings)) as svc,
        httpx.AsyncClient(base_url=base_url(svc), headers={"Authorization": f"Bearer {token}"}) as http,
    ):
        await eventually(lambda: consumer_caught_up(bus, DURABLE_LOGS, "LOGS"))
        assert await all_lines(http, run_id) == lines


async def test_log_pages_and_cursors(api: ApiService, http: httpx.AsyncClient, bus: Bus) -> None:
    run_id = await new_run(http)
    await publish_logs(bus, run_id, 1, range(3))
    await publish_logs(bus, run_id, 2, range(2))
    await eventually(lambda: consumer_caught_up(bus, DURABLE_LOGS, "LOGS"))

    pages, params = [], {"limit": 2}
    while True:
        page = (await http.get(f"/v1/runs/{run_id}/logs", params=params)).json()
        pages.append([(x["attempt"], x["seq"]) for x in page["lines"]])
        if not page["more"]:
            break
        params = {"limit": 2, "after_attempt": page["next_attempt"], "after_seq": page["next_seq"]}
    assert pages == [[(1, 0), (1, 1)], [(1, 2), (2, 0)], [(2, 1)]]
    only2 = await all_lines(http, run_id, attempt=2, after_seq=0)
    assert [(x["attempt"], x["seq"]) for x in only2] == [(2, 1)]
    assert only2[0]["ts"].endswith("Z")  # UTC, as written, on every database


async def test_metrics_by_step_with_superseded_points_hidden(
    api: ApiService, http: httpx.AsyncClient, bus: Bus
) -> None:
    run_id = await new_run(http)
    await publish_metrics(bus, run_id, 1, range(1, 11))
    await publish_metrics(bus, run_id, 1, range(1, 11), key="acc", seq0=100)
    await publish_metrics(bus, run_id, 1, range(1, 11))  # a replay: same (attempt, seq, key)
    nan = MetricPoint(seq=500, step=3, key="grad_norm", value=None, raw="nan")  # as a writer sends NaN
    await bus.publish(bus.subjects.run_metrics(run_id), MetricBatch(run_id=run_id, attempt=1, points=[nan]))
    await eventually(lambda: consumer_caught_up(bus, DURABLE_METRICS, "METRICS"))

    # attempt 2 resumed from step 5: attempt 1's steps 6..10 are no longer the run's history
    started = AttemptStarted(run_id=run_id, attempt=2, box_id="b2", resumed_from_step=5)
    await bus.publish(bus.subjects.run_events(run_id), started)
    await publish_metrics(bus, run_id, 2, range(6, 9), seq0=0)

    async def history() -> list[tuple[int, int]]:
        page = (await http.get(f"/v1/runs/{run_id}/metrics", params={"key": "loss"})).json()
        return [(p["step"], p["attempt"]) for p in page["points"]]

    want = [(s, 1) for s in range(1, 6)] + [(s, 2) for s in range(6, 9)]
    await eventually(lambda: _equals(history(), want))

    everything = (
        await http.get(f"/v1/runs/{run_id}/metrics", params={"key": "loss", "include_superseded": "true"})
    ).json()
    assert len(everything["points"]) == 13
    assert sum(p["superseded"] for p in everything["points"]) == 5
    steps = [p["step"] for p in everything["points"]]
    assert steps == sorted(steps)

    both = (await http.get(f"/v1/runs/{run_id}/metrics", params=[("key", "loss"), ("key", "acc")])).json()["points"]
    assert {p["key"] for p in both} == {"loss", "acc"} and len(both) == 8 + 5
    grad = (await http.get(f"/v1/runs/{run_id}/metrics", params={"key": "grad_norm"})).json()["points"]
    assert grad[0]["value"] is None and grad[0]["raw"] == "nan"
    keys = (await http.get(f"/v1/runs/{run_id}/metrics/keys")).json()["keys"]
    assert keys == ["acc", "grad_norm", "loss"]

    # pages never split a step
    page = (await http.get(f"/v1/runs/{run_id}/metrics", params={"limit": 3})).json()
    assert page["more"] and page["next_after_step"] == 1 and [p["step"] for p in page["points"]] == [1, 1]


async def _equals(value: Any, want: Any) -> bool:
    return bool(await value == want)


async def read_events(resp: httpx.Response, until: str, limit: int = 200) -> list[tuple[str, Any, str | None]]:
    """(event, data, id) tuples from a live SSE response, up to and including ``until``."""
    out: list[tuple[str, Any, str | None]] = []
    event, data, ident = None, None, None
    async for raw in resp.aiter_lines():
        if raw.startswith("event: "):
            event = raw[7:]
        elif raw.startswith("data: "):
            data = json.loads(raw[6:])
        elif raw.startswith("id: "):
            ident = raw[4:]
        elif raw == "" and event:
            out.append((event, data, ident))
            if event == until or len(out) >= limit:
                return out
            event, data, ident = None, None, None
    return out


async def test_follow_streams_new_lines_and_ends_when_the_run_ends(
    api: ApiService, http: httpx.AsyncClient, bus: Bus, provisioner: StandInProvisioner
) -> None:
    run_id = await new_run(http)
    await eventually(lambda: run_id in provisioner.runs)
    await publish_logs(bus, run_id, 1, range(3))
    await eventually(lambda: consumer_caught_up(bus, DURABLE_LOGS, "LOGS"))

    async with http.stream("GET", f"/v1/runs/{run_id}/logs", params={"follow": "1"}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        reader = asyncio.create_task(read_events(resp, until="end"))
        await asyncio.sleep(0.3)
        await provisioner.set_state(run_id, RunState.running)
        await publish_logs(bus, run_id, 1, range(3, 6))
        await asyncio.sleep(0.3)
        await provisioner.set_state(run_id, RunState.succeeded)
        await publish_logs(bus, run_id, 1, range(6, 7), fmt="last words {}")  # just after the end
        events = await asyncio.wait_for(reader, 15)

    lines = [d for e, d, _ in events if e == "line"]
    assert [x["seq"] for x in lines] == list(range(7))
    assert lines[-1]["text"] == "last words 6"
    states = [d["state"] for e, d, _ in events if e == "state"]
    assert states[-1] == "succeeded" and "running" in states
    assert events[-1][0] == "end" and events[-1][1]["state"] == "succeeded"

    # reconnecting with Last-Event-ID replays nothing already seen; an ended run ends at once
    third_id = [i for e, _, i in events if e == "line"][2]
    async with http.stream(
        "GET", f"/v1/runs/{run_id}/logs", params={"follow": "1"}, headers={"Last-Event-ID": str(third_id)}
    ) as resp:
        again = await asyncio.wait_for(read_events(resp, until="end"), 10)
    assert [d["seq"] for e, d, _ in again if e == "line"] == [3, 4, 5, 6]


@pytest.mark.postgres
async def test_ingest_and_queries_on_postgres(
    nats_server: NatsServer, subjects: Subjects, bus: Bus, choline_home: Path, pg_url: str
) -> None:
    service = f"t{uuid.uuid4().hex[:6]}api"
    engine = make_engine(pg_url, service)
    try:
        async with running(ApiService(api_settings(nats_server, subjects, choline_home), engine=engine)) as svc:
            token = json.loads((choline_home / "secrets" / "token.json").read_text())["api_token"]
            async with httpx.AsyncClient(base_url=base_url(svc), headers={"Authorization": f"Bearer {token}"}) as http:
                run_id = await new_run(http)
                await publish_logs(bus, run_id, 1, range(5))
                await publish_logs(bus, run_id, 1, range(2, 7))
                await publish_metrics(bus, run_id, 1, range(1, 6))
                await publish_metrics(bus, run_id, 1, range(1, 6))
                await eventually(lambda: consumer_caught_up(bus, DURABLE_LOGS, "LOGS"))
                await eventually(lambda: consumer_caught_up(bus, DURABLE_METRICS, "METRICS"))
                assert [x["seq"] for x in await all_lines(http, run_id)] == list(range(7))
                points = (await http.get(f"/v1/runs/{run_id}/metrics")).json()["points"]
                assert [p["step"] for p in points] == [1, 2, 3, 4, 5]
                me = await http.get("/v1/me")
                assert me.json()["user"] == "admin"
    finally:
        from sqlalchemy import text

        engine.dispose()
        drop = make_engine(pg_url, service)
        with drop.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema_name(service)}" CASCADE'))
        drop.dispose()
