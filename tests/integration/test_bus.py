"""The bus against a real nats-server with JetStream."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from choline_core.bus import Bus, Nack, Reject
from choline_core.embedded import NatsServer
from choline_core.errors import BusError
from choline_core.events import ControlAction, ControlCommand, Envelope, RunState, RunStateChanged
from choline_core.subjects import Subjects


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def state(run: str, st: RunState = RunState.running) -> RunStateChanged:
    return RunStateChanged(run_id=run, state=st)


async def collect(bus: Bus, durable: str, subject: str) -> tuple[list[Envelope], Callable[..., Awaitable[None]]]:
    got: list[Envelope] = []

    async def handler(env: Envelope) -> None:
        got.append(env)

    await bus.consume(durable, subject, handler)
    return got, handler


async def test_publish_and_consume(bus: Bus) -> None:
    s = bus.subjects
    got, _ = await collect(bus, "c1", s.all_run_events())
    for i in range(5):
        await bus.publish(s.run_events(f"r{i}"), state(f"r{i}"))
    await until(lambda: len(got) == 5)
    assert [e.event(RunStateChanged).run_id for e in got] == [f"r{i}" for i in range(5)]


async def test_dedup_by_message_id(bus: Bus) -> None:
    s = bus.subjects
    env = state("r1").envelope()
    a1 = await bus.publish(s.run_events("r1"), env)
    a2 = await bus.publish(s.run_events("r1"), env)  # a retry of the same message
    assert a2.duplicate and not a1.duplicate
    info = await bus.js.stream_info(s.stream_name("RUNS"))
    assert info.state.messages == 1


async def test_nack_redelivers_and_exception_retries(bus: Bus) -> None:
    s = bus.subjects
    seen: list[int] = []

    async def flaky(env: Envelope) -> None:
        seen.append(1)
        if len(seen) == 1:
            raise Nack("not yet", delay=0.1)
        if len(seen) == 2:
            raise RuntimeError("transient")

    consumer = await bus.consume("c2", s.all_run_events(), flaky, backoff=0.1)
    await bus.publish(s.run_events("r1"), state("r1"))
    await until(lambda: len(seen) == 3)
    await until(lambda: consumer.stats.acked == 1)
    assert consumer.stats.nacked == 1 and consumer.stats.errors == 1


async def test_reject_drops_for_good(bus: Bus) -> None:
    s = bus.subjects
    calls: list[str] = []

    async def picky(env: Envelope) -> None:
        calls.append(env.id)
        raise Reject("bad data")

    consumer = await bus.consume("c3", s.all_run_events(), picky)
    await bus.publish(s.run_events("r1"), state("r1"))
    await until(lambda: consumer.stats.rejected == 1)
    await asyncio.sleep(0.5)
    assert len(calls) == 1


async def test_two_consumers_share_one_durable(nats_server: NatsServer, bus: Bus) -> None:
    s = bus.subjects
    other = await Bus.connect(nats_server.url, name="replica", subjects=s, reconnect="fail-fast")
    got_a: list[str] = []
    got_b: list[str] = []

    async def ha(env: Envelope) -> None:
        got_a.append(env.id)
        await asyncio.sleep(0.01)

    async def hb(env: Envelope) -> None:
        got_b.append(env.id)
        await asyncio.sleep(0.01)

    await bus.consume("shared", s.all_run_events(), ha, batch=1)
    await other.consume("shared", s.all_run_events(), hb, batch=1)
    ids = [(await bus.publish(s.run_events("r"), e)) and e.id for e in (state("r").envelope() for _ in range(40))]
    await until(lambda: len(got_a) + len(got_b) == 40)
    assert sorted(got_a + got_b) == sorted(ids)  # each message handled once across the replicas
    await other.close()


async def test_request_reply(bus: Bus) -> None:
    s = bus.subjects

    async def answer(env: Envelope) -> RunStateChanged:
        cmd = env.event(ControlCommand)
        return RunStateChanged(run_id=cmd.run_id, state=RunState.paused)

    await bus.serve(s.rpc("provisioner", "control"), answer, queue="prov")
    reply = await bus.request(s.rpc("provisioner", "control"), ControlCommand(run_id="r9", action=ControlAction.pause))
    assert reply.event(RunStateChanged).state == RunState.paused

    async def broken(env: Envelope) -> None:
        raise ValueError("boom")

    await bus.serve(s.rpc("x", "broken"), broken)
    err = await bus.request(s.rpc("x", "broken"), state("r"))
    assert err.type == "error" and "boom" in err.data["message"]
    with pytest.raises(BusError, match="no service answers"):
        await bus.request(s.rpc("nobody", "home"), state("r"), timeout=1)


async def test_messages_survive_a_nats_restart(nats_server_fresh: NatsServer) -> None:
    s = Subjects("restart")
    b = await Bus.connect(nats_server_fresh.url, name="t", subjects=s, reconnect="forever")
    await b.ensure_streams()
    for i in range(10):
        await b.publish(s.run_events("r1"), state("r1", RunState.running if i % 2 else RunState.queued))
    await b.close()

    await asyncio.to_thread(nats_server_fresh.restart)

    b2 = await Bus.connect(nats_server_fresh.url, name="t2", subjects=s, reconnect="fail-fast")
    got, _ = await collect(b2, "after-restart", s.all_run_events())
    await until(lambda: len(got) == 10)
    await b2.close()


async def test_connected_client_rides_out_a_restart(nats_server_fresh: NatsServer) -> None:
    s = Subjects("ride")
    b = await Bus.connect(nats_server_fresh.url, name="t", subjects=s, reconnect="forever")
    await b.ensure_streams()
    got, _ = await collect(b, "ride", s.all_run_events())
    await b.publish(s.run_events("r1"), state("r1"))
    await until(lambda: len(got) == 1)
    await asyncio.to_thread(nats_server_fresh.restart)
    await until(lambda: b.connected, timeout=15)
    await b.publish(s.run_events("r1"), state("r1"))
    await until(lambda: len(got) == 2, timeout=15)
    await b.drain()


async def test_unreachable_nats_is_a_clear_error() -> None:
    from choline_core.embedded import free_port

    with pytest.raises(BusError, match="cannot reach NATS"):
        await Bus.connect(f"nats://127.0.0.1:{free_port()}", name="t", reconnect="fail-fast", connect_timeout=0.5)
