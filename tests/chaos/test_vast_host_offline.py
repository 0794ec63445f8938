"""Chaos on vast.ai (the emulator): the host of a running box goes offline mid-run; the run moves
to another host (never the lost one) and ends as one uninterrupted run, nothing left billing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from choline_core import faults

from .conftest import VAST_KEY, Chaos, Reference

pytestmark = [pytest.mark.slow, pytest.mark.chaos, pytest.mark.timeout(600)]


def test_vast_host_goes_offline_mid_run(chaos: Chaos, reference: Reference, emulator: Any) -> None:
    chaos.start("train.step=pause#80", "--provider", "vast", gpus="1x3090")
    faults.wait_reached("train.step#80", chaos.faults_dir, timeout=180)
    first = chaos.show()["attempts"][0]
    instance = emulator.get(int(first["instance_id"]))
    assert instance is not None
    emulator.machine_offline(int(instance.ask["machine_id"]))  # the host and every box on it go away
    faults.release("train.step#80", chaos.faults_dir)
    chaos.wait_attempts(2)
    info = chaos.verify(reference)
    assert len(info["attempts"]) == 2 and info["attempts"][0]["end_reason"].startswith("box lost")
    assert info["attempts"][1]["host"] != first["host"]  # never the host this run lost
    assert emulator.billing()["billing_instances"] == [] and emulator.leftovers() == []
    logs = "".join(p.read_text(errors="replace") for p in Path(chaos.cp.home).glob("logs/*.log"))
    assert logs and VAST_KEY not in logs  # the vast key never reaches a log
