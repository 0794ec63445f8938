"""A DataLoader that can stop at any batch and carry on from exactly there after a restart.

``Loader`` wraps a map-style dataset. It owns the shuffling order (a permutation drawn from ``(seed, epoch)``
with its own generator, never the global one, and saved in checkpoints), knows how many batches of the
current epoch it has handed out, and seeds the DataLoader workers **per batch** from ``(seed, epoch, batch,
rank)``: a worker's random augmentations then depend on which batch it is making, not on which worker makes
it or how many batches it made before, which is what lets a run resumed in the middle of an epoch, with
``num_workers > 0``, see the very same batches. With ``num_workers=0`` the dataset draws from the main
process's generators, which checkpoints capture.

Iterating a ``Loader`` continues where the last iteration stopped; when an epoch's batches run out, the
next epoch begins (so ``for batch in loader`` inside ``for epoch in run.epochs(n)`` does the usual thing).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler

from .serialize import _numpy

log = logging.getLogger(__name__)


def _mix(*parts: int) -> int:
    digest = hashlib.blake2b(b",".join(str(p).encode() for p in parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _seed_worker_rngs(seed: int) -> None:
    random.seed(seed)
    np = _numpy()
    if np is not None:
        np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _SeededDataset(Dataset[Any]):
    """Receives ``(seed, indices)`` from the batch sampler; in a worker, reseeds before fetching the batch."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, batch: tuple[int, list[int]]) -> list[Any]:
        seed, indices = batch
        if torch.utils.data.get_worker_info() is not None:
            _seed_worker_rngs(seed)
        inner = getattr(self.dataset, "__getitems__", None)
        if inner is not None:
            return list(inner(indices))
        return [self.dataset[i] for i in indices]


class _BatchPlan:
    """The batch sampler handed to torch's DataLoader: the batches of one epoch from ``start`` on."""

    def __init__(self, batches: list[list[int]], start: int, seeds: list[int]) -> None:
        self.batches, self.start, self.seeds = batches, start, seeds

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        for i in range(self.start, len(self.batches)):
            yield self.seeds[i], self.batches[i]

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start)


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Loader:
    """A resumable replacement for ``torch.utils.data.DataLoader`` over a map-style dataset.

    Under ``torch.distributed`` each rank takes its own slice of every epoch's order (padded like
    ``DistributedSampler`` so all ranks get the same number of batches).

    ``state_dict()`` holds the epoch, the number of batches already handed out in it, the seed and the
    order itself (so a resume does not depend on ``torch.randperm`` giving the same permutation on another
    version of torch).
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int = 1,
        shuffle: bool = False,
        *,
        drop_last: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool = False,
        worker_init_fn: Callable[[int], None] | None = None,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        timeout: float = 0,
        multiprocessing_context: Any = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if isinstance(dataset, IterableDataset):
            raise TypeError("choline.Loader needs a map-style dataset (with __len__ and __getitem__)")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.collate_fn = collate_fn
        self.pin_memory = pin_memory
        self.worker_init_fn = worker_init_fn
        self.prefetch_factor = prefetch_factor
        # Workers are started per epoch (and on resume); persistent workers would keep seeds of a past plan.
        self.persistent_workers = False
        self.timeout = timeout
        self.multiprocessing_context = multiprocessing_context
        self._rank, self._world = rank, world_size
        self.epoch = 0
        self.batch_index = 0  # batches of ``epoch`` already handed out
        self.on_batch: Callable[[], None] | None = None  # set by a Run that counts steps by batches
        # a poll point: called before each batch is fetched; True ends this epoch's iteration here (a stop),
        # leaving the position as it is (the epoch is not counted as done)
        self.before_batch: Callable[[], bool] | None = None
        self._order: torch.Tensor | None = None
        self._order_epoch: int | None = None
        self._loader: DataLoader[Any] | None = None

    # ---------------------------------------------------------------------------------- shape
    @property
    def rank(self) -> int:
        return self._rank if self._rank is not None else _distributed()[0]

    @property
    def world_size(self) -> int:
        return self._world if self._world is not None else _distributed()[1]

    def _per_rank(self) -> int:
        n, w = len(self.dataset), self.world_size
        if w == 1:
            return n
        return n // w if self.drop_last and n % w else math.ceil(n / w)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        per = self._per_rank()
        return per // self.batch_size if self.drop_last else math.ceil(per / self.batch_size)

    # ---------------------------------------------------------------------------------- order
    def order(self, epoch: int | None = None) -> torch.Tensor:
        """The whole epoch's sample order (all ranks), int64."""
        epoch = self.epoch if epoch is None else epoch
        if self._order is not None and self._order_epoch == epoch:
            return self._order
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(_mix(self.seed, epoch, 0x5EED))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        self._order, self._order_epoch = order.to(torch.int64), epoch
        return self._order

    def _batches(self) -> list[list[int]]:
        order = self.order()
        w, r = self.world_size, self.rank
        if w > 1:
            per = self._per_rank()
            total = per * w
            if total > len(order):
                reps = math.ceil(total / max(1, len(order)))
                order = order.repeat(reps)[:total]
            else:
                order = order[:total]
            order = order[r::w]
        idx = order.tolist()
        bs = self.batch_size
        batches = [idx[i : i + bs] for i in range(0, len(idx), bs)]
        if self.drop_last and batches and len(batches[-1]) < bs:
            batches.pop()
        return batches

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch (a no-op if that epoch is already under way)."""
        if epoch != self.epoch:
            self.epoch, self.batch_index = int(epoch), 0

    # ---------------------------------------------------------------------------------- iteration
    def _torch_loader(self, plan: _BatchPlan) -> DataLoader[Any]:
        g = torch.Generator()
        g.manual_seed(_mix(self.seed, self.epoch, 0xB45E))
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            if self.prefetch_factor is not None:
                kwargs["prefetch_factor"] = self.prefetch_factor
            kwargs["persistent_workers"] = False
            kwargs["multiprocessing_context"] = self.multiprocessing_context
            kwargs["timeout"] = self.timeout
        return DataLoader(
            _SeededDataset(self.dataset),
            batch_sampler=plan,  # type: ignore[arg-type]
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.pin_memory,
            worker_init_fn=self.worker_init_fn,
            generator=g,
            **kwargs,
        )

    def __iter__(self) -> Iterator[Any]:
        batches = self._batches()
        start = self.batch_index
        if start < len(batches):
            seeds = [_mix(self.seed, self.epoch, i, self.rank) for i in range(len(batches))]
            loader = self._torch_loader(_BatchPlan(batches, start, seeds))
            it = iter(loader)
            while True:
                if self.before_batch is not None and self.before_batch():
                    return
                try:
                    batch = next(it)
                except StopIteration:
                    break
                self.batch_index += 1
                if self.on_batch is not None:
                    self.on_batch()
                yield batch
        elif self.before_batch is not None and self.before_batch():
            return
        # The epoch's batches are used up: the next iteration is the next epoch.
        self.epoch += 1
        self.batch_index = 0

    @property
    def exhausted(self) -> bool:
        """All of this epoch's batches were handed out (the loop body of the last one may still be running)."""
        return self.batch_index >= len(self)

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_samples": len(self.dataset),
            "world_size": self.world_size,
            "order": self.order().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_samples"]) != len(self.dataset):
            raise ValueError(
                f"the checkpoint's loader saw {state['num_samples']} samples, this dataset has {len(self.dataset)}"
            )
        if int(state.get("world_size", 1)) != self.world_size:
            log.warning(
                "resuming with %d processes where the checkpoint had %s: batches will not line up exactly",
                self.world_size,
                state.get("world_size"),
            )
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self.epoch = int(state["epoch"])
        self.batch_index = int(state["batch_index"])
        order = state.get("order")
        if isinstance(order, torch.Tensor) and order.numel() == len(self.dataset):
            self._order, self._order_epoch = order.to(torch.int64), self.epoch
        else:
            self._order = None

    # ---------------------------------------------------------------------------------- adoption
    @classmethod
    def from_dataloader(cls, dl: DataLoader[Any] | Loader, *, seed: int = 0) -> Loader:
        """The resumable twin of a plain ``DataLoader`` (same dataset, batch size, shuffling, workers, collate).

        Raises ``TypeError`` for what cannot be resumed exactly: iterable datasets and custom samplers.
        """
        if isinstance(dl, Loader):
            return dl
        if isinstance(dl.dataset, IterableDataset):
            raise TypeError("an IterableDataset cannot be resumed in the middle of an epoch; use a map-style dataset")
        sampler = dl.sampler
        if dl.batch_sampler is not None and type(dl.batch_sampler).__name__ != "BatchSampler":
            raise TypeError(f"a custom batch_sampler ({type(dl.batch_sampler).__name__}) cannot be resumed exactly")
        if isinstance(sampler, RandomSampler):
            if sampler.replacement or sampler._num_samples is not None:
                raise TypeError("a RandomSampler with replacement or num_samples cannot be resumed exactly")
            shuffle = True
        elif isinstance(sampler, SequentialSampler):
            shuffle = False
        else:
            raise TypeError(
                f"a custom sampler ({type(sampler).__name__}) cannot be resumed exactly",
                "build a choline.Loader(dataset, batch_size=..., shuffle=...) instead",
            )
        if dl.batch_size is None:
            raise TypeError("a DataLoader without automatic batching (batch_size=None) is not supported")
        from torch.utils.data._utils.collate import default_collate

        return cls(
            dl.dataset,
            batch_size=dl.batch_size,
            shuffle=shuffle,
            drop_last=dl.drop_last,
            seed=seed,
            num_workers=dl.num_workers,
            collate_fn=None if dl.collate_fn is default_collate else dl.collate_fn,
            pin_memory=dl.pin_memory,
            worker_init_fn=dl.worker_init_fn,
            prefetch_factor=dl.prefetch_factor if dl.num_workers > 0 else None,
            persistent_workers=dl.persistent_workers,
            timeout=dl.timeout,
            multiprocessing_context=dl.multiprocessing_context,
        )
