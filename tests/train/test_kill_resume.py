"""Exact resume under SIGKILL: a run killed at any step (mid-epoch, at an epoch's end, in the middle of a
checkpoint write) and started again ends with weights bit-identical (``torch.equal``) to a run that was never
killed, with the same metric values at every step, with ``num_workers`` 0 and 2.

The processes are real and die by SIGKILL (``choline_core.faults`` ``crash``). A "durable" kill lets the
checkpoint in flight finish first, so the test knows where the next start resumes; the others may land in
the middle of a background write.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from choline.train import read_points

from ._procs import TINY, Result, assert_same_history, assert_same_weights, attempts, clean_env, launch

pytestmark = pytest.mark.slow

# 96 samples, batches of 8, accumulate 2: 6 optimizer steps an epoch, 3 epochs, 18 steps.
# checkpoint_every=4 -> checkpoints 4, 8, 12 (epoch 1's last step: taken after validation), 16, 18 (final).


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cache: dict[tuple[int, str], Path] = {}

    def get(workers: int, every: str) -> Path:
        key = (workers, every)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"ref-w{workers}-{every}")
            r = launch([str(TINY), "--run-dir", str(d / "run"), "--out", str(d / "final.safetensors"),
                        "--workers", str(workers), "--checkpoint-every", every])  # fmt: skip
            assert r.returncode == 0, r.stderr
            cache[key] = d
        return cache[key]

    return get


def chain(tmp_path: Path, workers: int, every: str, kills: list[tuple[str, bool, int | None]]) -> list[Result]:
    """Start, kill per ``kills`` (faults, durable, expected resume step of the NEXT start), then finish."""
    args = [str(TINY), "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "final.safetensors"),
            "--workers", str(workers), "--checkpoint-every", every]  # fmt: skip
    results = []
    for i, (spec, durable, _) in enumerate(kills):
        r = launch([*args, *(["--durable-kills"] if durable else [])], faults=spec)
        assert r.killed, f"kill {i} ({spec}) did not happen: rc={r.returncode}\n{r.stderr[-2000:]}"
        results.append(r)
    final = launch(args)
    assert final.returncode == 0, final.stderr[-3000:]
    results.append(final)
    recorded = [a["resumed_from_step"] for a in attempts(tmp_path / "run")]
    assert len(recorded) == len(kills) + 1
    for i, (_, _, expect_next) in enumerate(kills):
        if expect_next is not None:
            assert recorded[i + 1] == expect_next, f"start {i + 2} resumed from {recorded[i + 1]}, not {expect_next}"
    return results


def check(tmp_path: Path, ref: Path) -> None:
    assert_same_weights(ref / "final.safetensors", tmp_path / "final.safetensors")
    assert_same_history(ref / "run", tmp_path / "run")
    assert json.loads((tmp_path / "final.safetensors.json").read_text()) == {"callback_steps": 18, "step": 18}


@pytest.mark.parametrize(
    ("workers", "kills"),
    [
        (
            0,
            [
                ("test.step.3=crash", True, 0),  # before the first checkpoint: starts over
                ("test.step.6=crash", True, 4),  # epoch 0's last step, before its validation
                ("test.step.13=crash", False, None),  # mid-epoch, checkpoint 12 maybe still being written
            ],
        ),
        (
            2,
            [
                ("test.epoch_end.0=crash", True, 4),  # after epoch 0 (no checkpoint due): back to mid-epoch 4
                ("test.epoch_end.1=crash", True, 12),  # right after epoch 1's checkpoint
                ("test.step.15=crash", False, None),  # mid-epoch, checkpoint 12 or 16 may be in flight
            ],
        ),
    ],
    ids=["workers0", "workers2"],
)
def test_kills_mid_epoch_and_at_epoch_boundaries(tmp_path: Path, reference, workers: int, kills) -> None:  # type: ignore[no-untyped-def]
    chain(tmp_path, workers, "4", kills)
    check(tmp_path, reference(workers, "4"))


def test_a_kill_mid_write_and_a_damaged_checkpoint_fall_back(tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    args = [str(TINY), "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "final.safetensors"),
            "--checkpoint-every", "4", "--durable-kills"]  # fmt: skip
    ckpts = tmp_path / "run" / "checkpoints"
    # 1. dies writing its 2nd checkpoint (step 8): only 4 is complete
    r = launch(args, faults="checkpoint.before_manifest=crash@2")
    assert r.killed
    assert sorted(p.name for p in ckpts.iterdir()) == [".partial-8", "4"]
    # 2. resumes from 4, killed at 10 with 8 complete; then 8 gets damaged on disk
    r = launch(args, faults="test.step.10=crash")
    assert r.killed and (ckpts / "8" / "manifest.json").exists()
    model = ckpts / "8" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-7])
    # 3. skips 8 with a warning, resumes from 4, dies writing 8 again
    r = launch(args, faults="checkpoint.before_manifest=crash@1")
    assert r.killed
    assert "skipping checkpoint 8" in r.stderr and "bytes" in r.stderr
    # 4. finishes
    r = launch(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipping checkpoint 8" in r.stderr
    assert [a["resumed_from_step"] for a in attempts(tmp_path / "run")] == [0, 4, 4, 4]
    check(tmp_path, reference(0, "4"))


def test_kills_at_random_steps(tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    workers = 2
    seed = int(os.environ.get("CHOLINE_TEST_SEED") or time.time_ns() % 100_000)
    rnd = random.Random(seed)
    first = rnd.randint(1, 16)
    second = rnd.randint(first + 1, 17)
    kills = [(f"test.step.{first}=crash", rnd.random() < 0.5, None), (f"test.step.{second}=crash", False, None)]
    try:
        chain(tmp_path, workers, "4", kills)
        check(tmp_path, reference(workers, "4"))
    except AssertionError as exc:
        raise AssertionError(f"{exc} (kills {kills}; CHOLINE_TEST_SEED={seed} repeats them)") from exc


def test_a_sigkill_from_outside_at_a_random_moment(tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    """No barrier: the test watches metrics.jsonl and SIGKILLs the process (and its DataLoader workers
    notice their parent is gone) at a random point of training."""
    args = [str(TINY), "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "final.safetensors"),
            "--workers", "2", "--checkpoint-every", "4"]  # fmt: skip
    target = random.Random().randint(5, 15)
    # slow the steps down a little so the kill lands during training, not after it
    env = clean_env(CHOLINE_FAULTS="train.step=sleep:0.03")
    proc = subprocess.Popen([sys.executable, *args], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        steps = {p["step"] for p in read_points(tmp_path / "run")}
        if steps and max(steps) >= target:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    r = launch(args)
    assert r.returncode == 0, r.stderr[-3000:]
    check(tmp_path, reference(2, "4"))
