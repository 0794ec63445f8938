"""The chaos bed: one embedded control plane per module with loss timeouts of seconds, a
deterministic digits run with checkpoints every few steps, and an uninterrupted reference of the
same run computed once per session. Every scenario ends with the same checks (``verify``): the
run succeeded; its final weights are bit-identical to the reference's; for every step the
owning attempt is the one the rule names and its value equals the reference's; no point is
lost; no box is left."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import REPO, ControlPlane

ARGS = ["--epochs", "4", "--checkpoint-every", "15"]  # 45 steps an epoch: 180 steps, a checkpoint every 15
KEYS = ("train/loss", "val/loss", "val/accuracy")
CHAOS_ENV = {
    "CHOLINE_LOSS_TIMEOUT_S": "3",
    "CHOLINE_HEARTBEAT_S": "0.5",
    "CHOLINE_WATCH_INTERVAL_S": "0.2",
    "CHOLINE_PROBE_TIMEOUT_S": "3",
}


@dataclass
class Reference:
    weights: dict[str, Any]
    points: dict[tuple[str, int], float]
    last_step: int


def load_weights(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return dict(load_file(str(path)))


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The digits run, uninterrupted, started directly (no control plane)."""
    import choline

    work = tmp_path_factory.mktemp("reference")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHOLINE_")}
    env["CHOLINE_HOME"] = str(work / "home")
    out = subprocess.run(
        [sys.executable, str(REPO / "examples/digits/train.py"), *ARGS, "--run-dir", str(work / "run")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    points = {(p["key"], int(p["step"])): p["value"] for p in choline.history(work / "run") if p["key"] in KEYS}
    return Reference(load_weights(work / "run" / "model.safetensors"), points, max(s for _, s in points))


# Barriers inside the control plane's services. They are released at start (every pass goes
# through); a test arms the one it needs (``faults.arm``), waits for it, acts, and releases it. A
# service the supervisor restarts keeps the same environment, so its barriers hold the same way.
SERVICE_BARRIERS = (
    "provision.after_create",
    "provision.before_bootstrap",
    "syncer.checkpoint.before_record",
    "provision.tunnel_reconnect",
)
VAST_KEY = "chaos-vast-key-0123456789"


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A vast.ai emulator the chaos control plane rents from with ``--provider vast``."""
    from vast_emulator import Emulator, EmulatorServer

    emu = Emulator(tmp_path_factory.mktemp("vast-boxes"))
    with EmulatorServer(emu, VAST_KEY) as server:
        emu.url = server.url  # type: ignore[attr-defined]
        yield emu


@pytest.fixture(scope="session")
def controlplane(tmp_path_factory: pytest.TempPathFactory, emulator: Any) -> Iterator[ControlPlane]:
    """One control plane for the whole chaos suite (``choline up`` once)."""
    cp = ControlPlane(tmp_path_factory.mktemp("chaos-home"))
    armed = cp.home / "faults"
    armed.mkdir()
    from choline_core import faults

    for name in SERVICE_BARRIERS:
        faults.release(name, armed)
    env = dict(
        CHAOS_ENV,
        CHOLINE_FAULTS=",".join(f"{n}=pause" for n in SERVICE_BARRIERS),
        CHOLINE_FAULTS_DIR=str(armed),
        CHOLINE_VAST_API_KEY=VAST_KEY,
        CHOLINE_VAST_URL=emulator.url,
    )
    with cp.running(**env):
        yield cp


@pytest.fixture
def project(tmp_path: Path) -> Path:
    dest = tmp_path / "digits"
    shutil.copytree(REPO / "examples" / "digits", dest, ignore=shutil.ignore_patterns("choline-runs", "__pycache__"))
    return dest


class Chaos:
    """One chaos run: start it detached, watch it, hurt it, then verify it."""

    def __init__(self, cp: ControlPlane, project: Path, faults_dir: Path) -> None:
        self.cp = cp
        self.project = project
        self.faults_dir = faults_dir
        faults_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = ""

    def start(self, faults: str = "", *extra: str, gpus: str = "1xcpu") -> str:
        env_args = ["--env", f"CHOLINE_FAULTS={faults}", "--env", f"CHOLINE_FAULTS_DIR={self.faults_dir}"]
        out = self.cp.cli("run", "--detach", *env_args, *extra, "train.py", f"--{gpus}", *ARGS, cwd=self.project)
        assert out.returncode == 0, out.stderr
        self.run_id = out.stdout.strip().splitlines()[-1]
        return self.run_id

    def show(self) -> dict[str, Any]:
        out = self.cp.cli("show", self.run_id, "--json")
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))

    def wait_state(self, *states: str, timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        info: dict[str, Any] = {}
        while time.monotonic() < deadline:
            info = self.show()
            if info["state"] in states:
                return info
            time.sleep(0.3)
        raise AssertionError(f"run {self.run_id} never reached {states}: {info.get('state')} ({info.get('reason')})")

    def wait_attempts(self, n: int, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.show()
            if len(info["attempts"]) >= n:
                return info
            assert info["state"] not in ("failed", "cancelled"), info
            time.sleep(0.3)
        raise AssertionError(f"run {self.run_id} never had {n} attempts")

    def current_instance(self) -> str:
        attempts = self.show()["attempts"]
        assert attempts and attempts[-1]["instance_id"], attempts
        return str(attempts[-1]["instance_id"])

    def kill_box(self) -> str:
        from choline_provisioner.providers import localbox

        instance = self.current_instance()
        localbox.kill_box(self.cp.home / "boxes" / instance)
        return instance

    def verify(self, reference: Reference) -> dict[str, Any]:
        """The checks every scenario ends with."""
        info = self.wait_state("succeeded", "failed", "cancelled")
        assert info["state"] == "succeeded", (info["state"], info["reason"], info["attempts"])
        pulled = self.cp.cli("pull", self.run_id, "--dest", str(self.project / "results"))
        assert pulled.returncode == 0, pulled.stderr
        import torch

        weights = load_weights(self.project / "results" / "model.safetensors")
        assert weights.keys() == reference.weights.keys()
        for name, tensor in reference.weights.items():
            assert torch.equal(weights[name], tensor), f"{name} differs from the uninterrupted run"
        # the merged history: every step once, from the attempt the rule names, equal to the reference
        starts = {a["attempt"]: a["resumed_from_step"] or 0 for a in info["attempts"]}
        from choline.client import CholineClient
        from choline_core.settings import CholineSettings

        os.environ["CHOLINE_HOME"] = str(self.cp.home)  # restored by the autouse choline_home fixture
        with CholineClient.from_settings(CholineSettings()) as api:
            points = api.metrics(self.run_id, list(KEYS))
        got: dict[tuple[str, int], float | None] = {}
        for p in points:
            key = (p.key, p.step)
            assert key not in got, f"{key} appears twice in the run's history"
            got[key] = p.value
            owner = max(a for a, r in starts.items() if r < p.step or a == 1)
            assert p.attempt == owner, f"step {p.step} is attempt {p.attempt}'s, the rule names {owner}"
        missing = set(reference.points) - set(got)
        assert not missing, f"{len(missing)} points lost, e.g. {sorted(missing)[:5]}"
        for key, value in reference.points.items():
            assert got[key] == value, f"{key}: {got[key]} != reference {value}"
        deadline = time.monotonic() + 15
        while self.cp.live_boxes():
            assert time.monotonic() < deadline, f"boxes left: {self.cp.live_boxes()}"
            time.sleep(0.2)
        return info


@pytest.fixture
def chaos(controlplane: ControlPlane, project: Path, tmp_path: Path) -> Chaos:
    return Chaos(controlplane, project, tmp_path / "faults")


@pytest.fixture
def service_faults(controlplane: ControlPlane) -> Iterator[Path]:
    """Where the services' barriers hold; every one is released again after the test."""
    from choline_core import faults

    path = controlplane.home / "faults"
    yield path
    for name in SERVICE_BARRIERS:
        faults.release(name, path)


def component_pid(cp: ControlPlane, name: str) -> int:
    out = cp.cli("status", "--json")
    return int(json.loads(out.stdout)["components"][name]["pid"])


def wait_component_back(cp: ControlPlane, name: str, old_pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        comp = json.loads(cp.cli("status", "--json").stdout).get("components", {}).get(name, {})
        if comp.get("pid") and comp["pid"] != old_pid and comp.get("health") == "healthy":
            return
        time.sleep(0.3)
    raise AssertionError(f"{name} did not come back")
