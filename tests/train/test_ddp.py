"""The Trainer under torchrun with DistributedDataParallel (gloo, two CPU processes): rank 0 logs and
checkpoints, every rank's RNG state goes into the checkpoint, and a run SIGKILLed on both ranks resumes to
weights bit-identical to an uninterrupted one, with the same metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from choline.train import load_checkpoint

from ._procs import TINY, assert_same_history, assert_same_weights, attempts, launch_ddp

pytestmark = pytest.mark.slow


def test_ddp_on_gloo_resumes_bit_identical(tmp_path: Path) -> None:
    def args(name: str, *extra: str) -> list[str]:
        return [str(TINY), "--run-dir", str(tmp_path / name), "--out", str(tmp_path / f"{name}.safetensors"), *extra]

    ref = launch_ddp(args("ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    # 96 samples over 2 ranks, batches of 8, accumulate 2: 3 steps an epoch, 9 in all; checkpoints 4, 8, 9
    assert sorted(int(p.name) for p in (tmp_path / "ref" / "checkpoints").iterdir()) == [4, 8, 9]
    rngs = load_checkpoint(tmp_path / "ref" / "checkpoints" / "4")["_choline"]["rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])  # one state per rank

    killed = launch_ddp(args("cut", "--durable-kills"), faults="test.step.5=crash")
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    resumed = launch_ddp(args("cut"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [a["resumed_from_step"] for a in attempts(tmp_path / "cut")] == [0, 4]
    assert_same_weights(tmp_path / "ref.safetensors", tmp_path / "cut.safetensors")
    assert_same_history(tmp_path / "ref", tmp_path / "cut")
