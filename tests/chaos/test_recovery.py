"""Chaos: boxes die mid-run; the run recovers on new boxes and reads as one uninterrupted run."""

from __future__ import annotations

import random

import pytest

from choline_core import faults

from .conftest import Chaos, Reference

pytestmark = [pytest.mark.slow, pytest.mark.chaos, pytest.mark.timeout(600)]


def test_box_killed_at_three_random_steps(chaos: Chaos, reference: Reference) -> None:
    rng = random.Random(20261123)
    steps = sorted(rng.sample(range(20, reference.last_step - 10), 3))
    chaos.start(",".join(f"train.step=pause#{s}" for s in steps))
    for n, step in enumerate(steps, start=1):
        # the script holds at the step (a barrier), the box dies there, the step passes afterwards
        faults.wait_reached(f"train.step#{step}", chaos.faults_dir, timeout=180)
        chaos.kill_box()
        faults.release(f"train.step#{step}", chaos.faults_dir)
        chaos.wait_attempts(n + 1)
    info = chaos.verify(reference)
    assert len(info["attempts"]) == 4
    for attempt, step in zip(info["attempts"][:3], steps, strict=True):
        assert attempt["end_reason"].startswith("box lost")
        assert attempt["last_step"] is None or attempt["last_step"] <= step
    resumed = [a["resumed_from_step"] for a in info["attempts"][1:]]
    # each recovery resumed from a checkpoint no older than one interval before the kill
    for r, step in zip(resumed, steps, strict=True):
        assert step - 15 <= r <= step, (r, step)
