"""Batch-size search on the CPU against a stated memory budget: the edge is real (one more sample does not
fit), the answer keeps 10 % of the memory free and really fits, trials use the largest samples (a search on
small ones picks a size that overflows on long inputs), nothing of the model, optimizer or random state
changes, the result is recorded in the run, and the Trainer reuses it on a resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import choline
from choline.train import read_points
from choline.train.batchsize import _CpuMeter, find_batch_size, largest_first, parse_bytes
from choline_core.errors import UserError

BUDGET = 24 * 2**20


class Sequences(Dataset):
    """Mostly short sequences (128), one in ten long (1024): a padded batch is as long as its longest."""

    def __init__(self, n: int = 200) -> None:
        g = torch.Generator().manual_seed(0)
        self.items = [
            (torch.randn(1024 if i % 10 == 3 else 128, generator=g), int(i % 2)) for i in range(n)
        ]  # fmt: skip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.items[i]


def pad(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(x) for x, _ in batch)
    out = torch.zeros(len(batch), n)
    for i, (x, _) in enumerate(batch):
        out[i, : len(x)] = x
    return out, torch.tensor([y for _, y in batch])


class Net(nn.Module):
    """Few parameters, wide activations: ~0.6 MB of memory per 1024-long sample in a training step."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 32, 3, padding=1)
        self.mix = nn.Conv1d(32, 32, 1)
        self.head = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x.unsqueeze(1)))
        h = torch.relu(self.mix(h))
        return self.head(h.mean(-1))


def step_peak(model: nn.Module, opt: torch.optim.Optimizer, batch: Any) -> int:
    meter = _CpuMeter()
    meter.start()
    x, y = batch
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    peak = meter.peak()
    opt.state.clear()
    return peak


@pytest.fixture
def setup() -> tuple[nn.Module, torch.optim.Optimizer, Sequences]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = Net()
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), Sequences()


def test_the_answer_fits_with_headroom_and_the_edge_is_real(setup: Any, run_dir: Path) -> None:
    model, opt, data = setup
    run = choline.init(run_dir=run_dir, seed=0, threads=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.get_rng_state()
    result = find_batch_size(
        model, data, loss_fn=nn.functional.cross_entropy, optimizer=opt, collate_fn=pad, memory_budget=BUDGET
    )
    assert 2 <= result.batch_size <= result.edge < len(data)
    assert not result.capped and result.limit_bytes == BUDGET
    assert result.peak_bytes <= 0.9 * BUDGET
    failed = [t["batch_size"] for t in result.trials if not t["fits"]]
    assert min(b for b in failed if b > result.edge) == result.edge + 1  # one more sample is over the limit
    assert any(t["fits"] and t["batch_size"] == result.edge for t in result.trials)

    # the search left nothing behind
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert opt.state_dict()["state"] == {}
    assert torch.equal(torch.get_rng_state(), rng_before)

    # checked independently: the answer with the longest samples fits; twice the edge does not
    order = largest_first(data)
    assert step_peak(model, opt, pad([data[i] for i in order[: result.batch_size]])) <= BUDGET
    assert step_peak(model, opt, pad([data[i] for i in order[: 2 * result.edge]])) > BUDGET

    # recorded in the run
    meta = json.loads((run.dir / "run.json").read_text())
    assert meta["batch_size_search"]["batch_size"] == result.batch_size
    assert run.records["batch_size"]["edge"] == result.edge
    run.finish()
    assert [p["value"] for p in read_points(run_dir) if p["key"] == "batch_size"] == [result.batch_size]


def test_probing_small_samples_would_overflow_on_long_ones(setup: Any) -> None:
    model, opt, data = setup
    common = {"loss_fn": nn.functional.cross_entropy, "optimizer": opt, "collate_fn": pad, "memory_budget": BUDGET}
    right = find_batch_size(model, data, **common)
    naive = find_batch_size(model, data, size_fn=lambda s: -s[0].numel(), **common)  # smallest first
    assert naive.batch_size > 3 * right.batch_size
    order = largest_first(data)
    assert step_peak(model, opt, pad([data[i] for i in order[: naive.batch_size]])) > BUDGET


def test_multiple_of_and_cap(setup: Any) -> None:
    model, opt, data = setup
    result = find_batch_size(
        model, data, loss_fn=nn.functional.cross_entropy, optimizer=opt, collate_fn=pad,
        memory_budget="1GiB", max_batch_size=12, multiple_of=4,
    )  # fmt: skip
    assert result.capped and result.edge == 12 and result.batch_size % 4 == 0


def test_refusals() -> None:
    model = Net()
    with pytest.raises(UserError, match="needs memory_budget"):
        find_batch_size(model, Sequences(10))
    with pytest.raises(UserError, match="even a batch of 1 does not fit"):
        find_batch_size(model, Sequences(10), loss_fn=nn.functional.cross_entropy, collate_fn=pad, memory_budget=1000)
    with pytest.raises(UserError, match="headroom"):
        find_batch_size(model, Sequences(10), memory_budget="1GB", headroom=1.5)
    assert parse_bytes("1.5 GiB") == 3 * 2**29 and parse_bytes("512MB") == 512 * 2**20 and parse_bytes(10) == 10
    with pytest.raises(UserError, match="not a size"):
        parse_bytes("lots")


class Stop(Exception):
    pass


def test_the_trainer_searches_once_and_a_resume_reuses_it(setup: Any, run_dir: Path) -> None:
    def fit(crash: bool) -> choline.Trainer:
        run = choline.init(run_dir=run_dir, seed=0, threads=1)
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        class Crash(choline.Callback):
            def on_step_end(self, trainer: choline.Trainer, step: int, logs: dict[str, float]) -> None:
                if crash and step == 3:
                    trainer.run.wait()
                    raise Stop

        trainer = choline.Trainer(
            model, opt, nn.functional.cross_entropy, DataLoader(Sequences(), batch_size=1, collate_fn=pad),
            epochs=1, checkpoint_every=2, auto_batch_size={"memory_budget": BUDGET}, callbacks=[Crash()],
        )  # fmt: skip
        try:
            trainer.fit()
        finally:
            run.finish()
        return trainer

    with pytest.raises(Stop):
        fit(crash=True)
    first = json.loads((run_dir / "run.json").read_text())["batch_size_search"]
    trainer = fit(crash=False)
    assert trainer.batch_size_result is None  # no second search
    assert trainer.loader.batch_size == first["batch_size"] > 1
    assert trainer.run.step == -(-len(Sequences()) // first["batch_size"])
    assert len([p for p in read_points(run_dir) if p["key"] == "batch_size"]) == 1
