"""The provisioner's lifecycle on real local boxes: idempotency under redelivery and crashes,
teardown, the reaper, the loss rule, offers that cannot be had, schedules."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from choline_core.events import ControlAction, RunState
from choline_provisioner.providers import LABEL_BOX, LABEL_INSTALLATION, InstanceRequest
from choline_provisioner.providers.local import LocalProvider
from choline_provisioner.sshclient import ensure_run_key

from .conftest import Client, ProvisionerProc, live_boxes

pytestmark = pytest.mark.slow


async def wait_for(cond, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


async def test_redelivered_request_rents_one_box_and_cancel_tears_down(
    prov: ProvisionerProc, client: Client, choline_home: Path
) -> None:
    prov.start()
    run_id = await client.request_run()
    await client.request_run(run_id)  # the same request again (a redelivery)
    info = await client.wait_state(run_id, RunState.syncing, RunState.running)
    assert len(info.attempts) == 1 and info.attempts[0].box_id
    assert len(live_boxes(choline_home)) == 1
    t0 = time.monotonic()
    await client.control(run_id, ControlAction.cancel)
    info = await client.wait_state(run_id, RunState.cancelled, timeout=15)
    await wait_for(lambda: not live_boxes(choline_home), timeout=10)
    assert time.monotonic() - t0 < 10  # destroyed within 10 s
    assert info.attempts[0].end_reason == "cancelled"


@pytest.mark.parametrize("barrier", ["provision.after_create", "provision.before_bootstrap", "provision.mid_bootstrap"])
async def test_provisioner_killed_at_a_barrier_picks_up_without_a_second_box(
    prov: ProvisionerProc, client: Client, choline_home: Path, barrier: str
) -> None:
    prov.start(faults=f"{barrier}=crash")
    run_id = await client.request_run()
    assert prov.wait_exit(60) != 0  # died at the barrier
    assert f"{barrier}" and len(list((choline_home / "boxes").iterdir())) == 1
    prov.start()
    info = await client.wait_state(run_id, RunState.syncing, RunState.running, timeout=60)
    assert len(info.attempts) == 1
    assert len(live_boxes(choline_home)) == 1
    agents = list(choline_home.glob(f"boxes/*/choline/{run_id}/1/agent.pid"))
    assert len(agents) == 1  # the agent was started once, by one provisioner
    await client.control(run_id, ControlAction.cancel)
    await client.wait_state(run_id, RunState.cancelled)
    await wait_for(lambda: not live_boxes(choline_home), timeout=10)


async def test_reaper_destroys_only_unowned_boxes_of_this_installation(
    prov: ProvisionerProc, prov_env: dict[str, str], client: Client, choline_home: Path
) -> None:
    provider = LocalProvider(home=choline_home)
    key = ensure_run_key("stray")
    offer = (await provider.search_offers(__import__("choline_core.specs").specs.parse_gpu_spec("cpu")))[0]
    ours = await provider.create_instance(
        offer,
        InstanceRequest(
            ssh_public_key=key.public_key,
            labels={LABEL_INSTALLATION: prov_env["CHOLINE_INSTALLATION_ID"], LABEL_BOX: "b-not-a-box"},
        ),
    )
    other = await provider.create_instance(
        offer, InstanceRequest(ssh_public_key=key.public_key, labels={LABEL_INSTALLATION: "someone-else"})
    )
    prov.start()
    run_id = await client.request_run()
    await client.wait_state(run_id, RunState.syncing, RunState.running)
    await wait_for(lambda: not (choline_home / "boxes" / ours).exists(), timeout=20)
    assert (choline_home / "boxes" / other).exists()  # another installation's box is never touched
    assert len(live_boxes(choline_home)) == 2  # the run's box and the foreign one
    await provider.destroy_instance(other)
    await client.control(run_id, ControlAction.cancel)
    await client.wait_state(run_id, RunState.cancelled)


async def test_unsatisfiable_spec_fails_clearly_without_a_box(
    prov: ProvisionerProc, client: Client, choline_home: Path
) -> None:
    prov.start()
    run_id = await client.request_run(gpus="8xH100")
    info = await client.wait_state(run_id, RunState.failed)
    assert "no local offer matches 8xH100" in (info.reason or "")
    assert not live_boxes(choline_home)


async def test_silent_but_alive_box_is_not_lost_and_a_dead_one_is(
    prov: ProvisionerProc, client: Client, choline_home: Path
) -> None:
    # The agent frozen (SIGSTOP) past the loss timeout: silence alone must not count as a loss
    # while the box answers SSH. A SIGKILLed box must.
    prov.start(CHOLINE_LOSS_TIMEOUT_S="2")
    run_id = await client.request_run()
    info = await client.wait_state(run_id, RunState.running, timeout=60)
    pid_file = next(choline_home.glob(f"boxes/*/choline/{run_id}/1/agent.pid"))
    agent_pid = int(pid_file.read_text().strip())
    os.kill(agent_pid, signal.SIGSTOP)
    try:
        await wait_for(lambda: "silent but alive" in prov.log_text(), timeout=30)
    finally:
        os.kill(agent_pid, signal.SIGCONT)
    info = await client.get(run_id)
    assert info is not None and info.state is RunState.running and len(info.attempts) == 1
    instance = info.attempts[0].instance_id
    assert instance
    await LocalProvider(home=choline_home).kill(instance)
    info = await client.wait_state(run_id, RunState.recovering, RunState.provisioning, RunState.syncing, timeout=30)
    deadline = time.monotonic() + 60
    while len(info.attempts) < 2 or info.state is not RunState.running:
        assert time.monotonic() < deadline, info
        await asyncio.sleep(0.3)
        info = await client.get(run_id) or info
    assert info.attempts[0].end_reason and info.attempts[0].end_reason.startswith("box lost")
    assert info.attempts[1].box_id != info.attempts[0].box_id
    await client.control(run_id, ControlAction.cancel)
    await client.wait_state(run_id, RunState.cancelled)
    await wait_for(lambda: not live_boxes(choline_home), timeout=10)


async def test_scheduled_run_survives_a_restart_and_starts_on_time(
    prov: ProvisionerProc, client: Client, choline_home: Path
) -> None:
    prov.start()
    start_at = datetime.now(timezone.utc) + timedelta(seconds=20)
    run_id = await client.request_run(start_at=start_at)
    await client.wait_state(run_id, RunState.scheduled)
    prov.stop()
    prov.start()
    await client.wait_state(run_id, RunState.scheduled)
    info = await client.wait_state(run_id, RunState.syncing, RunState.running, timeout=40)
    assert datetime.now(timezone.utc) >= start_at
    assert info.attempts and info.attempts[0].started_at is not None
    await client.control(run_id, ControlAction.cancel)
    await client.wait_state(run_id, RunState.cancelled)
