"""The real provisioner renting through the vast provider from the emulator (end to end).

Uses the provisioner's own fixtures (a provisioner and a syncer as processes on the session's
NATS and S3, a bus client): a run on ``--provider vast`` whose first instance
sticks in ``loading`` gets that instance destroyed and runs on the next offer's host;
cancelling it leaves nothing rented.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from vast_emulator import Emulator, EmulatorServer

from choline_core.events import ControlAction, RunState
from tests.provisioner import conftest as provisioner_fixtures
from tests.provisioner.conftest import Client, ServiceProc

from .conftest import API_KEY

# the provisioner's fixtures, under their own names
prov = provisioner_fixtures.prov
client = provisioner_fixtures.client
prov_env = provisioner_fixtures.prov_env
syncer = provisioner_fixtures.syncer


@pytest.mark.slow
@pytest.mark.e2e
async def test_a_run_on_vast_skips_a_stuck_instance(prov: ServiceProc, client: Client, tmp_path: Path) -> None:
    emulator = Emulator(tmp_path / "vast-boxes")  # boxes layered on this interpreter, like local boxes
    emulator.set_faults({"next_create": ["stuck"]})
    with EmulatorServer(emulator, API_KEY) as server:
        prov.start(CHOLINE_VAST_API_KEY=API_KEY, CHOLINE_VAST_URL=server.url, CHOLINE_BOOT_TIMEOUT_S="3")
        run_id = await client.request_run(provider="vast", gpus="1x3090")
        info = await client.wait_state(run_id, RunState.running, timeout=120)
        first, second = info.attempts
        assert first.provider == "vast" and "still loading" in (first.end_reason or "")
        assert second.host != first.host and second.instance_id in {str(i) for i in emulator.instances}
        assert list(emulator.instances) == [int(second.instance_id or 0)]  # the stuck one was destroyed

        await client.control(run_id, ControlAction.cancel)
        await client.wait_state(run_id, RunState.cancelled, timeout=30)
        deadline = time.monotonic() + 15
        while emulator.instances and time.monotonic() < deadline:
            time.sleep(0.1)
        assert emulator.billing()["billing_instances"] == [] and emulator.leftovers() == []
    assert API_KEY not in prov.log_text()


@pytest.mark.slow
@pytest.mark.e2e
async def test_budget_refuses_offers_over_the_price_and_stops_a_run_that_spent_it(
    prov: ServiceProc, client: Client, tmp_path: Path
) -> None:
    emulator = Emulator(tmp_path / "vast-boxes")
    with EmulatorServer(emulator, API_KEY) as server:
        prov.start(CHOLINE_VAST_API_KEY=API_KEY, CHOLINE_VAST_URL=server.url)
        # every 3090 costs more than $0.10/h once storage is added: refused before anything is rented
        cheap = await client.request_run(provider="vast", gpus="1x3090", max_price=0.10)
        info = await client.wait_state(cheap, RunState.failed, timeout=60)
        assert "under $0.10/h" in (info.reason or "") and not emulator.instances
        # a budget of a fraction of a cent: the run starts, spends it within seconds, and is stopped
        capped = await client.request_run(provider="vast", gpus="1x3090", budget=0.0004)
        info = await client.wait_state(capped, RunState.failed, timeout=120)
        assert "budget of $0.00 reached" in (info.reason or "")
        assert info.cost >= 0.0004 and info.attempts[0].price_per_hour
        deadline = time.monotonic() + 15
        while emulator.instances and time.monotonic() < deadline:
            time.sleep(0.1)
        assert emulator.billing()["billing_instances"] == [] and emulator.leftovers() == []
