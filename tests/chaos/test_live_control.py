"""Chaos with live control: a run paused (its box released, nothing billed) and resumed on a new box;
a learning-rate change followed by a box loss that resumes from a checkpoint older than the change
(the change is replayed where it first took effect). Both end bit-identical to their references."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from choline_core import faults

from .conftest import ARGS, KEYS, REPO, Chaos, Reference, load_weights

pytestmark = [pytest.mark.slow, pytest.mark.chaos, pytest.mark.timeout(600)]


def wait_log(chaos: Chaos, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in chaos.cp.cli("logs", chaos.run_id).stderr:
            return
        time.sleep(0.3)
    raise AssertionError(f"{text!r} never appeared in the run's logs")


def test_pause_then_resume(chaos: Chaos, reference: Reference) -> None:
    chaos.start("train.step=pause#70")
    faults.wait_reached("train.step#70", chaos.faults_dir, timeout=180)
    assert chaos.cp.cli("pause", chaos.run_id).returncode == 0
    wait_log(chaos, "control: pause")
    faults.release("train.step#70", chaos.faults_dir)
    t0 = time.monotonic()
    info = chaos.wait_state("paused", timeout=120)
    deadline = time.monotonic() + 10
    while chaos.cp.live_boxes():  # the box is released once the pause checkpoint is stored
        assert time.monotonic() < deadline, "the box outlived the pause by more than 10 s"
        time.sleep(0.2)
    assert info["attempts"][0]["end_reason"] == "paused" and time.monotonic() - t0 < 60
    cost = info["cost"]
    time.sleep(1.0)
    assert chaos.show()["cost"] == cost  # nothing billed while paused
    assert chaos.cp.cli("resume", chaos.run_id).returncode == 0
    info = chaos.verify(reference)
    assert len(info["attempts"]) == 2 and info["attempts"][1]["resumed_from_step"] == 70


@pytest.fixture(scope="module")
def lr_reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The digits run without interruption, its learning rate set to 0.01 at step 70."""
    import choline

    work = tmp_path_factory.mktemp("lr-reference")
    run_dir = work / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHOLINE_")}
    env.update(
        CHOLINE_HOME=str(work / "home"), CHOLINE_FAULTS="train.step=pause#70", CHOLINE_FAULTS_DIR=str(work / "faults")
    )
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "examples/digits/train.py"), *ARGS, "--run-dir", str(run_dir)],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    faults.wait_reached("train.step#70", work / "faults", timeout=120)
    from choline.train.channel import send

    send(run_dir, "set", {"lr": 0.01})
    faults.release("train.step#70", work / "faults")
    assert proc.wait(300) == 0, proc.stderr.read() if proc.stderr else ""
    records = [json.loads(line) for line in (run_dir / "controls.jsonl").read_text().splitlines()]
    assert [(r["step"], r["ok"]) for r in records] == [(70, True)]
    points = {(p["key"], int(p["step"])): p["value"] for p in choline.history(run_dir) if p["key"] in KEYS}
    return Reference(load_weights(run_dir / "model.safetensors"), points, max(s for _, s in points))


def test_lr_change_then_a_kill_before_the_next_checkpoint(chaos: Chaos, lr_reference: Reference) -> None:
    # checkpoints every 15 steps: the change lands at step 70, the box dies at step 72, before the
    # checkpoint of step 75, so the next attempt resumes from step 60 and must replay the change
    chaos.start("train.step=pause#70,train.step=pause#72")
    faults.wait_reached("train.step#70", chaos.faults_dir, timeout=180)
    assert chaos.cp.cli("set", chaos.run_id, "lr=0.01").returncode == 0
    wait_log(chaos, "control: set")
    time.sleep(0.5)  # the agent has handed it to the library's reader
    faults.release("train.step#70", chaos.faults_dir)
    faults.wait_reached("train.step#72", chaos.faults_dir, timeout=120)
    chaos.kill_box()
    faults.release("train.step#72", chaos.faults_dir)
    chaos.wait_attempts(2)
    info = chaos.verify(lr_reference)
    assert info["attempts"][1]["resumed_from_step"] == 60
