"""State snapshots and the files they become: safetensors (checked with the reference reader) and a
weights-only ``state.pt``; buffers reused between snapshots; clear errors for what cannot be saved."""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from choline.train.serialize import (
    BufferPool,
    CheckpointError,
    load_tree,
    rebuild,
    snapshot,
    write_safetensors,
    write_tree,
)


def _equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _save_and_load(state: dict, tmp_path: Path) -> dict:
    snap = snapshot(state)
    tensors = {}
    for fname, group in snap.tensors.items():
        write_safetensors(tmp_path / fname, group)
        tensors[fname] = load_file(str(tmp_path / fname))  # the reference reader
    write_tree(tmp_path / "state.pt", snap.tree)
    return rebuild(load_tree(tmp_path / "state.pt"), tensors)


def test_round_trip_of_a_real_training_state(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    extra = {
        "odd": [torch.zeros(0), torch.tensor(3.5, dtype=torch.float64), torch.tensor([True, False])],
        "half": torch.randn(3, 2).to(torch.bfloat16),
        "ints": OrderedDict([(1, torch.arange(4, dtype=torch.int32)), (2, (1, 2.5, None, "s", b"b"))]),
        "np": np.arange(6, dtype=np.uint16).reshape(2, 3),
        "npscalar": np.float32(1.5),
        "dtype": torch.float16,
    }
    state = {"model": model, "optimizer": opt, "scheduler": sched, "extra": extra}
    back = _save_and_load(state, tmp_path)
    assert _equal(back["model"], model.state_dict())
    assert _equal(back["optimizer"], opt.state_dict())
    assert _equal(back["scheduler"], sched.state_dict())
    assert back["extra"]["npscalar"] == 1.5
    assert _equal(back["extra"]["np"], extra["np"])
    assert _equal(back["extra"]["ints"], extra["ints"]) and isinstance(back["extra"]["ints"], OrderedDict)
    assert back["extra"]["dtype"] is torch.float16
    fresh = torch.optim.AdamW(model.parameters(), lr=5.0)
    fresh.load_state_dict(back["optimizer"])
    assert fresh.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    # the model's file is a plain state dict: loadable without choline
    assert set(load_file(str(tmp_path / "model.safetensors"))) == set(model.state_dict())


def test_state_file_loads_weights_only_and_holds_no_tensors(tmp_path: Path) -> None:
    snap = snapshot({"model": torch.nn.Linear(2, 2)})
    write_tree(tmp_path / "state.pt", snap.tree)
    tree = torch.load(tmp_path / "state.pt", weights_only=True)
    assert tree["model"]["weight"] == {"__choline_tensor__": ["model.safetensors", "weight"]}


def test_a_snapshot_is_a_copy_and_reuses_its_buffers() -> None:
    w = torch.ones(1000)
    pool = BufferPool()
    snap = snapshot({"w": {"t": w}}, pool)
    buf = snap.tensors["w.safetensors"]["t"]
    w.add_(1)  # training goes on
    assert torch.equal(buf, torch.ones(1000))
    snap2 = snapshot({"w": {"t": w}}, pool)
    assert snap2.tensors["w.safetensors"]["t"].data_ptr() == buf.data_ptr()
    assert torch.equal(buf, torch.full((1000,), 2.0))


def test_prepare_allocates_the_buffers_a_snapshot_then_uses() -> None:
    model = torch.nn.Linear(64, 64)
    pool = BufferPool()
    pool.prepare({"model": model})
    ptr = pool.get("model.safetensors", "weight", model.weight, pin=False).data_ptr()
    snap = snapshot({"model": model}, pool)
    assert snap.tensors["model.safetensors"]["weight"].data_ptr() == ptr


class Opaque:
    pass


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"x": {"obj": Opaque()}}, "Opaque"),
        ({"x": {"f": lambda: 1}}, "function"),
        ({"x": {(1, 2): 3}}, "dict key"),
        ({"x": torch.tensor([1 + 2j])}, "dtype"),
        ({"x": np.array(["a"])}, "NumPy array"),
    ],
)
def test_what_cannot_be_checkpointed_is_named(state: dict, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        snapshot(state)


def test_a_pickle_payload_is_refused_on_load(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "state.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_tree(tmp_path / "state.pt")


def test_buffers_of_keys_that_went_away_are_freed() -> None:
    pool = BufferPool()
    snapshot({"a": {"x": torch.ones(3), "y": torch.ones(4)}}, pool)
    snapshot({"a": {"x": torch.ones(3)}}, pool)
    assert pool._bufs.keys() == {("a.safetensors", "x")}
