"""Per-box NATS credentials on a real nats-server in operator/JWT mode: a box reaches its own
run's subjects and nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from choline_core.bus import Bus
from choline_core.embedded import NatsServer
from choline_core.errors import BusError
from choline_core.events import ControlAction, ControlCommand, Envelope, Heartbeat, LogBatch, LogLine
from choline_core.natsauth import NatsAuth, decode_jwt
from choline_core.subjects import Subjects

S = Subjects("choline")


@pytest.fixture
def auth(tmp_path: Path) -> NatsAuth:
    return NatsAuth.load_or_create(tmp_path / "secrets")


@pytest.fixture
def server(tmp_path: Path, auth: NatsAuth) -> Iterator[NatsServer]:
    conf = tmp_path / "auth.conf"
    conf.write_text(auth.server_config())
    srv = NatsServer(tmp_path / "nats", config_file=conf)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
async def service(server: NatsServer, auth: NatsAuth, tmp_path: Path) -> AsyncIterator[Bus]:
    creds = tmp_path / "svc.creds"
    creds.write_text(auth.service_creds())
    bus = await Bus.connect(server.url, name="svc", creds=str(creds), reconnect="fail-fast", subjects=S)
    await bus.ensure_streams()
    yield bus
    await bus.close()


async def box_bus(server: NatsServer, auth: NatsAuth, tmp_path: Path, run: str, box: str, ttl: float = 600) -> Bus:
    creds = tmp_path / f"{box}.creds"
    creds.write_text(auth.box_creds("choline", run, box, ttl_s=ttl))
    return await Bus.connect(
        server.url, name=box, creds=str(creds), inbox_prefix=S.inbox_prefix(box), reconnect="fail-fast", subjects=S
    )


def test_seeds_are_private_and_reused(auth: NatsAuth, tmp_path: Path) -> None:
    path = tmp_path / "secrets" / NatsAuth.FILE
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert NatsAuth.load_or_create(tmp_path / "secrets").account.public == auth.account.public
    claims = decode_jwt(auth.box_creds("choline", "r1", "b1", ttl_s=60).split("\n")[1])
    assert claims["iss"] == auth.account.public and claims["exp"] - claims["iat"] == 60
    assert "$JS.API.>" not in str(claims["nats"])


async def test_box_publishes_its_own_run_only(server: NatsServer, auth: NatsAuth, service: Bus, tmp_path: Path) -> None:
    box = await box_bus(server, auth, tmp_path, "r1", "b1")
    logs = LogBatch(run_id="r1", attempt=1, lines=[LogLine(seq=0, text="hi")])
    assert (await box.publish(S.run_logs("r1"), logs)).seq >= 1
    await box.publish(S.box_heartbeat("b1"), Heartbeat(box_id="b1", agent_version="t"))
    with pytest.raises(BusError):
        await box.publish(S.run_logs("r2"), LogBatch(run_id="r2", attempt=1, lines=[]), retries=0, timeout=1.5)
    with pytest.raises(BusError):
        await box.publish(S.box_heartbeat("b2"), Heartbeat(box_id="b2", agent_version="t"), retries=0, timeout=1.5)
    with pytest.raises(Exception):  # no JetStream API: the control plane creates consumers  # noqa: B017
        await asyncio.wait_for(box.js.stream_info(S.stream_name("RUNS")), 3)
    info = await service.js.stream_info(S.stream_name("LOGS"))
    assert info.state.messages == 1  # only the allowed batch landed
    await box.close()


async def test_box_receives_only_its_own_control(
    server: NatsServer, auth: NatsAuth, service: Bus, tmp_path: Path
) -> None:
    box = await box_bus(server, auth, tmp_path, "r1", "b1")
    got: list[str] = []

    async def on(env: Envelope) -> None:
        got.append(env.event(ControlCommand).run_id)

    await box.subscribe_core(S.run_control("r1"), on)
    await box.subscribe_core(S.run_control("r2"), on)  # refused by the server: never delivers
    await asyncio.sleep(0.3)
    for run in ("r1", "r2"):
        await service.publish(S.run_control(run), ControlCommand(run_id=run, action=ControlAction.pause))
    await asyncio.sleep(1.0)
    assert got == ["r1"]
    await box.close()


async def test_box_requests_reach_the_syncer_through_its_inbox(
    server: NatsServer, auth: NatsAuth, service: Bus, tmp_path: Path
) -> None:
    async def answer(env: Envelope) -> Heartbeat:
        return Heartbeat(box_id="svc", agent_version="ok")

    await service.serve(S.all_run_requests("presign"), answer, queue="syncer")
    box = await box_bus(server, auth, tmp_path, "r1", "b1")
    reply = await box.request(S.run_request("r1", "presign"), Heartbeat(box_id="b1", agent_version="t"))
    assert reply.event(Heartbeat).agent_version == "ok"
    with pytest.raises(BusError):
        await box.request(S.run_request("r2", "presign"), Heartbeat(box_id="b1", agent_version="t"), timeout=1.5)
    await box.close()


async def test_expired_credentials_are_refused(server: NatsServer, auth: NatsAuth, tmp_path: Path) -> None:
    creds = tmp_path / "old.creds"
    creds.write_text(auth.box_creds("choline", "r1", "b1", ttl_s=1))
    await asyncio.sleep(2.5)
    with pytest.raises(BusError):
        await Bus.connect(server.url, name="late", creds=str(creds), reconnect="fail-fast", connect_timeout=1)
