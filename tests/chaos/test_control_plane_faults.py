"""Chaos: the agent, NATS and S3 fail mid-run; the run still ends as one uninterrupted run."""

from __future__ import annotations

import os
import signal

import pytest

from choline_core import faults

from .conftest import Chaos, Reference, component_pid, wait_component_back

pytestmark = [pytest.mark.slow, pytest.mark.chaos, pytest.mark.timeout(600)]


def agent_pid(chaos: Chaos) -> int:
    instance = chaos.current_instance()
    attempt = len(chaos.show()["attempts"])
    path = chaos.cp.home / "boxes" / instance / "choline" / chaos.run_id / str(attempt) / "agent.pid"
    return int(path.read_text().strip())


def test_agent_killed(chaos: Chaos, reference: Reference) -> None:
    chaos.start("train.step=pause#70")
    faults.wait_reached("train.step#70", chaos.faults_dir, timeout=180)
    os.kill(agent_pid(chaos), signal.SIGKILL)
    faults.release("train.step#70", chaos.faults_dir)
    chaos.verify(reference)


def test_nats_restarted_mid_run(chaos: Chaos, reference: Reference) -> None:
    chaos.start("train.step=pause#70")
    faults.wait_reached("train.step#70", chaos.faults_dir, timeout=180)
    old = component_pid(chaos.cp, "nats")
    os.kill(old, signal.SIGKILL)  # the supervisor restarts it; everyone reconnects
    faults.release("train.step#70", chaos.faults_dir)
    wait_component_back(chaos.cp, "nats", old)
    info = chaos.verify(reference)
    assert len(info["attempts"]) == 1  # NATS going away is not a lost box


def test_s3_restarted_during_checkpoint_uploads(chaos: Chaos, reference: Reference) -> None:
    chaos.start("train.step=pause#100")
    faults.wait_reached("train.step#100", chaos.faults_dir, timeout=180)
    old = component_pid(chaos.cp, "s3")
    os.kill(old, signal.SIGKILL)
    faults.release("train.step#100", chaos.faults_dir)  # checkpoints at 105, 120 ... upload into the outage
    wait_component_back(chaos.cp, "s3", old)
    info = chaos.verify(reference)
    assert len(info["attempts"]) == 1
