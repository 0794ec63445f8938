"""Checkpoint folders: complete ones verify, a write that dies before its manifest leaves nothing that looks
complete, damaged ones are skipped for the previous one with a warning, writes never overlap."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from choline.train.checkpoint import CheckpointWriter, Written, load_checkpoint, newest_valid
from choline_core import faults
from choline_core.agent_protocol import MANIFEST, verify_checkpoint


@pytest.fixture
def set_faults(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    def apply(spec: str) -> None:
        monkeypatch.setenv(faults.ENV, spec)
        faults.reload()

    yield apply
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.reload()


def state(value: float) -> dict:
    return {"model": {"w": torch.full((256,), value), "b": torch.tensor(value)}, "meta": {"v": value}}


def test_a_written_checkpoint_is_complete_and_loads(tmp_path: Path) -> None:
    written: list[Written] = []
    w = CheckpointWriter(tmp_path, on_written=written.append)
    w.save(5, state(1.5), {"epoch": 2, "reason": "epoch", "metrics": {"loss": 0.25}})
    assert w.wait(10)
    m = verify_checkpoint(tmp_path / "5")
    assert (m.step, m.epoch, m.reason, m.metrics) == (5, 2, "epoch", {"loss": 0.25})
    assert sorted(f.path for f in m.files) == ["model.safetensors", "state.pt"]  # "meta" holds no tensor
    back = load_checkpoint(tmp_path / "5")
    assert torch.equal(back["model"]["w"], torch.full((256,), 1.5)) and back["meta"] == {"v": 1.5}
    assert [x.step for x in written] == [5]
    assert not list(tmp_path.glob(".*"))  # no temporary names left
    w.close()


def test_a_write_that_dies_before_its_manifest_leaves_no_checkpoint(tmp_path: Path, set_faults) -> None:  # type: ignore[no-untyped-def]
    set_faults("checkpoint.before_manifest=raise@2")
    w = CheckpointWriter(tmp_path)
    w.save(1, state(1.0))
    w.save(2, state(2.0))
    w.wait(10)
    assert len(w.errors) == 1 and isinstance(w.errors[0], faults.FaultInjected)
    assert not (tmp_path / "2").exists()
    assert newest_valid(tmp_path) is not None and newest_valid(tmp_path)[0].name == "1"  # type: ignore[index]
    w.close()


def test_leftovers_of_a_killed_write_are_cleared_at_the_next_start(tmp_path: Path) -> None:
    partial = tmp_path / ".partial-9"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"half")
    CheckpointWriter(tmp_path).close()
    assert not partial.exists()


def test_damaged_checkpoints_are_skipped_for_the_previous_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w = CheckpointWriter(tmp_path, asynchronous=False)
    for step in (1, 2, 3, 4):
        w.save(step, state(float(step)))
    data = (tmp_path / "4" / "model.safetensors").read_bytes()
    (tmp_path / "4" / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    data = bytearray((tmp_path / "3" / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit, same size
    (tmp_path / "3" / "model.safetensors").write_bytes(bytes(data))
    (tmp_path / "2" / MANIFEST).unlink()  # never completed
    with caplog.at_level(logging.WARNING):
        found = newest_valid(tmp_path)
    assert found is not None and found[1].step == 1
    text = caplog.text
    assert "checkpoint 4" in text and "checkpoint 3" in text and "checkpoint 2" in text
    assert "sha256" in text and "bytes" in text
    assert torch.equal(load_checkpoint(found[0])["model"]["w"], torch.full((256,), 1.0))


def test_a_save_waits_for_the_write_in_flight(tmp_path: Path, set_faults) -> None:  # type: ignore[no-untyped-def]
    set_faults("checkpoint.file_written=sleep:0.4")
    done: list[int] = []
    w = CheckpointWriter(tmp_path, on_written=lambda x: done.append(x.step))
    first = w.save(1, state(1.0))
    assert done == [] and w.busy  # written in the background
    second = w.save(2, state(2.0))
    assert done == [1]  # the first write finished before the second snapshot was taken
    assert second > first
    w.wait(10)
    assert done == [1, 2]
    w.close()


def test_writing_the_same_step_again_replaces_it(tmp_path: Path) -> None:
    w = CheckpointWriter(tmp_path, asynchronous=False)
    w.save(3, state(1.0))
    w.save(3, state(7.0))
    assert torch.equal(load_checkpoint(tmp_path / "3")["model"]["b"], torch.tensor(7.0))
    assert not list(tmp_path.glob(".*"))
    assert w.remove(3) and not (tmp_path / "3").exists() and not w.remove(3)
