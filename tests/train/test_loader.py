"""The resumable Loader: a loader stopped at any batch and rebuilt from its state gives the same batches,
worker randomness depends on the batch (not on the worker), ranks split every epoch between them."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, WeightedRandomSampler

from choline.train.data import Loader


class Noisy(Dataset):
    """Every sample draws from Python's, NumPy's and torch's generators."""

    def __len__(self) -> int:
        return 30

    def __getitem__(self, i: int):
        return torch.tensor([float(i), random.random(), float(np.random.rand()), float(torch.rand(()))])


def epoch_batches(loader: Loader) -> list[torch.Tensor]:
    return [b.clone() for b in loader]


def test_the_order_is_a_function_of_seed_and_epoch() -> None:
    a = Loader(TensorDataset(torch.arange(20)), batch_size=4, shuffle=True, seed=3)
    b = Loader(TensorDataset(torch.arange(20)), batch_size=4, shuffle=True, seed=3)
    torch.manual_seed(0)
    first = [x[0].tolist() for x in a]
    torch.manual_seed(1)  # the global generator plays no part
    assert first == [x[0].tolist() for x in b]
    second = [x[0].tolist() for x in a]
    assert second != first and sorted(i for b in second for i in b) == list(range(20))
    assert a.epoch == 2 and a.batch_index == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_rebuilt_from_its_state_continues_with_the_same_batches(workers: int) -> None:
    ref = Loader(Noisy(), batch_size=4, shuffle=True, seed=5, num_workers=workers)
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    full = epoch_batches(ref)

    half = Loader(Noisy(), batch_size=4, shuffle=True, seed=5, num_workers=workers)
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    it = iter(half)
    head = [next(it).clone() for _ in range(3)]
    saved = half.state_dict()
    rng_state = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    del it

    again = Loader(Noisy(), batch_size=4, shuffle=True, seed=0, num_workers=workers)
    again.load_state_dict(saved)
    torch.set_rng_state(rng_state[0])
    random.setstate(rng_state[1])
    np.random.set_state(rng_state[2])
    tail = epoch_batches(again)
    assert len(head) + len(tail) == len(full) == 8
    for x, y in zip(head + tail, full, strict=True):
        assert torch.equal(x, y)
    assert again.epoch == 1


def test_worker_randomness_follows_the_batch_not_the_worker() -> None:
    one = epoch_batches(Loader(Noisy(), batch_size=4, shuffle=True, seed=5, num_workers=1))
    two = epoch_batches(Loader(Noisy(), batch_size=4, shuffle=True, seed=5, num_workers=2))
    for x, y in zip(one, two, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(one[0][:, 1:], one[1][:, 1:])  # and it is random


@pytest.mark.parametrize(("n", "drop_last"), [(10, False), (11, False), (11, True)])
def test_ranks_split_each_epoch(n: int, drop_last: bool) -> None:
    ds = TensorDataset(torch.arange(n))
    shards = [
        Loader(ds, batch_size=2, shuffle=True, seed=1, rank=r, world_size=3, drop_last=drop_last) for r in range(3)
    ]
    seen = [[int(i) for b in s for i in b[0]] for s in shards]
    assert len({len(x) for x in seen}) == 1 and len({len(s) for s in shards}) == 1
    flat = [i for x in seen for i in x]
    if drop_last:
        assert len(set(flat)) == len(flat)  # no sample twice
    else:
        assert set(flat) == set(range(n))  # every sample (padded by repeating a few)


def test_from_dataloader_keeps_the_settings_and_refuses_what_cannot_resume() -> None:
    ds = TensorDataset(torch.arange(10))
    ld = Loader.from_dataloader(DataLoader(ds, batch_size=3, shuffle=True, drop_last=True), seed=4)
    assert (ld.batch_size, ld.shuffle, ld.drop_last, ld.seed, len(ld)) == (3, True, True, 4, 3)
    assert not Loader.from_dataloader(DataLoader(ds, batch_size=3)).shuffle
    with pytest.raises(TypeError, match="custom sampler"):
        Loader.from_dataloader(DataLoader(ds, sampler=WeightedRandomSampler([1.0] * 10, 10)))
    with pytest.raises(TypeError, match="replacement"):
        Loader.from_dataloader(DataLoader(ds, sampler=torch.utils.data.RandomSampler(ds, replacement=True)))


def test_a_state_from_another_dataset_is_refused() -> None:
    saved = Loader(TensorDataset(torch.arange(10)), batch_size=2).state_dict()
    with pytest.raises(ValueError, match="10 samples"):
        Loader(TensorDataset(torch.arange(12)), batch_size=2).load_state_dict(saved)
