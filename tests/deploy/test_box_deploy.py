"""A deployment on a rented box, end to end on the vast.ai emulator: ``choline deploy model digits --gpus 1x3090
--provider vast`` rents a box through the provisioner, the agent runs the serving process, predictions through
the gateway equal the bundle in process (the box's direct URL wants its token); the box's host goes offline and
the provisioner's new box serves again; undeploy leaves nothing billing."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import choline

from ..e2e.conftest import ControlPlane
from ..serve.conftest import digits_bundle  # noqa: F401  (session fixture)

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(600)]

VAST_KEY = "deploy-vast-key-0123456789"
PIXELS = [float((i * 3) % 17) for i in range(64)]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from vast_emulator import Emulator, EmulatorServer

    emu = Emulator(tmp_path_factory.mktemp("vast-boxes"))
    with EmulatorServer(emu, VAST_KEY) as server:
        emu.url = server.url  # type: ignore[attr-defined]
        yield emu


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory, emulator: Any) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("deploy-vast-cp"))
    with plane.running(
        CHOLINE_VAST_API_KEY=VAST_KEY,
        CHOLINE_VAST_URL=emulator.url,
        CHOLINE_LOSS_TIMEOUT_S="3",
        CHOLINE_HEARTBEAT_S="0.5",
        CHOLINE_WATCH_INTERVAL_S="0.2",
        CHOLINE_PROBE_TIMEOUT_S="3",
        CHOLINE_DEPLOY_CHECK_INTERVAL_S="0.5",
    ):
        yield plane


def ok_json(cp: ControlPlane, *args: str) -> Any:
    out = cp.cli(*args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_for(check: Any, timeout: float = 180, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.5)


def test_deploy_on_a_vast_box_survives_its_host_and_leaves_nothing(
    cp: ControlPlane,
    emulator: Any,
    digits_bundle: Path,  # noqa: F811
) -> None:
    pushed = ok_json(cp, "models", "push", str(digits_bundle), "--json")
    assert (pushed["name"], pushed["version"]) == ("digits", 1)
    d = ok_json(cp, "deploy", "model", "digits", "--gpus", "1x3090", "--provider", "vast", "--json")
    assert d["state"] == "ready" and d["config"]["gpus"] == "1x3090"
    (replica,) = d["replicas"]
    run_id = replica["run_id"]
    assert run_id and replica["url"]

    want = choline.load_bundle(digits_bundle).predict(torch.tensor([PIXELS]))[0]
    got = ok_json(cp, "predict", "digits", "--json", json.dumps({"pixels": PIXELS}))["digit"]["value"]
    assert torch.equal(torch.tensor(got, dtype=torch.float32), want)
    direct = httpx.post(f"{replica['url']}/predict", json={"pixels": PIXELS}, timeout=30)
    assert direct.status_code == 401  # the box's own URL is not open to anyone
    run = ok_json(cp, "show", run_id, "--json")
    assert run["provider"] == "vast" and run["state"] == "running"

    # the box's host goes offline: the provisioner rents another box, the serving process starts there
    first = run["attempts"][-1]
    instance = emulator.get(int(first["instance_id"]))
    emulator.machine_offline(int(instance.ask["machine_id"]))

    def moved() -> Any:
        cur = ok_json(cp, "deployments", "ls", "--json")[0]
        r = cur["replicas"][0]
        return cur if cur["state"] == "ready" and r["url"] != replica["url"] and r["restarts"] >= 1 else None

    cur = wait_for(moved, what="the deployment on a new box")
    got = ok_json(cp, "predict", "digits", "--json", json.dumps({"pixels": PIXELS}))["digit"]["value"]
    assert torch.equal(torch.tensor(got, dtype=torch.float32), want)
    attempts = ok_json(cp, "show", run_id, "--json")["attempts"]
    assert len(attempts) >= 2 and attempts[0]["end_reason"].startswith("box lost")
    assert cur["replicas"][0]["run_id"] == run_id  # the same serving run, recovered like a training run

    # undeploy: the run is cancelled, the box destroyed, nothing bills
    assert cp.cli("undeploy", "digits").returncode == 0
    assert ok_json(cp, "show", run_id, "--json")["state"] == "cancelled"
    wait_for(lambda: emulator.billing()["billing_instances"] == [] and emulator.leftovers() == [], 60, "no box")
    assert ok_json(cp, "deployments", "ls", "--json") == []
    os.environ.pop("CHOLINE_VAST_API_KEY", None)
    logs = "".join(p.read_text(errors="replace") for p in Path(cp.home).glob("logs/*.log"))
    assert VAST_KEY not in logs
