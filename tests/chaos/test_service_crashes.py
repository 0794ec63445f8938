"""Chaos inside the control plane: the provisioner killed right after renting a box and again right
before bootstrapping it (the restarted one adopts the box: no second one); the syncer killed while
recording a checkpoint (the event comes again: nothing lost or recorded twice); every box's tunnels
cut for longer than the heartbeat interval (not a lost box). Each run ends as if uninterrupted."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from choline_core import faults

from .conftest import Chaos, Reference, component_pid, wait_component_back

pytestmark = [pytest.mark.slow, pytest.mark.chaos, pytest.mark.timeout(600)]


def test_provisioner_killed_after_create_and_before_bootstrap(
    chaos: Chaos, reference: Reference, service_faults: Path
) -> None:
    boxes_before = set((chaos.cp.home / "boxes").iterdir()) if (chaos.cp.home / "boxes").is_dir() else set()
    for barrier in ("provision.after_create", "provision.before_bootstrap"):
        faults.arm(barrier, service_faults)
    chaos.start()
    for barrier in ("provision.after_create", "provision.before_bootstrap"):
        faults.wait_reached(barrier, service_faults, timeout=120)
        old = component_pid(chaos.cp, "provisioner")
        os.kill(old, signal.SIGKILL)
        faults.release(barrier, service_faults)
        wait_component_back(chaos.cp, "provisioner", old)
    info = chaos.verify(reference)
    assert len(info["attempts"]) == 1
    new_boxes = set((chaos.cp.home / "boxes").iterdir()) - boxes_before
    assert len(new_boxes) <= 1  # one box rented in all (its folder may be gone already)


def test_syncer_killed_mid_commit(chaos: Chaos, reference: Reference, service_faults: Path) -> None:
    faults.arm("syncer.checkpoint.before_record", service_faults)
    chaos.start()
    faults.wait_reached("syncer.checkpoint.before_record", service_faults, timeout=120)
    old = component_pid(chaos.cp, "syncer")
    os.kill(old, signal.SIGKILL)  # the checkpoint event is redelivered to the restarted syncer
    faults.release("syncer.checkpoint.before_record", service_faults)
    wait_component_back(chaos.cp, "syncer", old)
    chaos.verify(reference)


def test_tunnels_cut_longer_than_the_heartbeat_is_not_a_loss(
    chaos: Chaos, reference: Reference, service_faults: Path
) -> None:
    chaos.start("train.step=pause#70")
    faults.wait_reached("train.step#70", chaos.faults_dir, timeout=180)
    faults.arm("provision.tunnel_reconnect", service_faults)
    os.kill(component_pid(chaos.cp, "provisioner"), signal.SIGUSR1)  # drop every box's SSH and tunnels
    faults.wait_reached("provision.tunnel_reconnect", service_faults, timeout=60)
    faults.release("train.step#70", chaos.faults_dir)  # training goes on while the tunnels are down
    time.sleep(2.0)  # the cut lasts longer than the 0.5 s heartbeat interval, less than the 3 s loss timeout
    faults.release("provision.tunnel_reconnect", service_faults)
    info = chaos.verify(reference)
    assert len(info["attempts"]) == 1  # a cut tunnel is not a lost box
