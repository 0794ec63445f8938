"""Dynamic batching: requests that arrive together share one forward pass.

Requests queue up as ``Item``s (one request's samples, already checked and converted). One worker task takes
the oldest item, waits at most ``max_wait`` for more (no wait when 0), takes queued items of the same sample
shapes up to ``max_batch`` samples, and runs them on one inference thread. While that thread computes, new
requests keep queueing, so under load the next batch is ready when the current one ends even with no wait.
A model whose forward pass takes less than ``inline_below_s`` (measured, a moving average) runs on the event
loop itself: handing a 50-microsecond forward to a thread and back would cost more than the forward. So does
a lone request when nothing else is in flight (``idle``) and the forward pass is shorter than
``idle_inline_below_s``: there is no other work for the loop to overlap with, a request that arrives meanwhile
would wait for the model anyway, and the pass is too short to outlast a request's timeout. A request
larger than ``max_batch`` runs in chunks of ``max_batch``. A request whose caller gave up (timeout,
disconnect) before its batch started is skipped. Every caller gets the slice of the output that belongs to
its own samples, in order.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger("choline.serve")

Forward = Callable[[list[torch.Tensor], int], list[bytes]]  # (batched inputs, n) -> n encoded predictions


class Overloaded(Exception):
    """More samples are waiting than the queue holds."""


@dataclass
class Item:
    samples: list[list[torch.Tensor]]  # per sample, per input
    key: tuple[tuple[int, ...], ...]  # the shapes of one sample's inputs: items batch together when equal
    future: asyncio.Future[list[bytes]]
    queued: float = field(default_factory=time.perf_counter)
    parts: list[bytes] = field(default_factory=list)  # finished pieces of a request larger than max_batch


@dataclass
class Stats:
    requests: int = 0
    samples: int = 0
    batches: int = 0
    errors: int = 0
    skipped: int = 0
    largest_batch: int = 0
    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "samples": self.samples,
            "batches": self.batches,
            "errors": self.errors,
            "skipped": self.skipped,
            "largest_batch": self.largest_batch,
            "mean_batch": round(self.samples / self.batches, 3) if self.batches else 0.0,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
        }


class Batcher:
    """``await submit(samples)`` -> one encoded prediction per sample. ``start()`` in the serving loop;
    ``close()`` finishes what is queued, then stops the worker."""

    def __init__(
        self,
        forward: Forward,
        *,
        max_batch: int = 32,
        max_wait_s: float = 0.002,
        max_queue: int = 4096,
        inline_below_s: float = 0.0005,
        idle: Callable[[], bool] | None = None,
        idle_inline_below_s: float = 0.05,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.forward = forward
        self.max_batch = max_batch
        self.max_wait_s = max(0.0, max_wait_s)
        self.max_queue = max_queue
        self.inline_below_s = inline_below_s
        self.idle = idle or (lambda: False)  # True: nothing else is in flight (no work to overlap with)
        self.idle_inline_below_s = idle_inline_below_s  # ... for forward passes short enough not to outlast a timeout
        self.forward_s: float | None = None  # moving average of one forward pass (per batch)
        self.queue: collections.deque[Item] = collections.deque()
        self.queued_samples = 0
        self.stats = Stats()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="choline-infer")

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="choline-batcher")

    async def close(self) -> None:
        """Run everything already queued, then stop."""
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            await self._task
        self._pool.shutdown(wait=True)

    def note_forward(self, seconds: float) -> None:
        """Fold one forward pass's duration into the moving average (decides inline or threaded)."""
        self.forward_s = seconds if self.forward_s is None else 0.8 * self.forward_s + 0.2 * seconds

    @property
    def pending(self) -> int:
        return self.queued_samples

    async def submit(self, samples: list[list[torch.Tensor]]) -> list[bytes]:
        """Queue one request's samples; the future resolves to their predictions (raises what the model raised)."""
        if self._task is None or self._wake is None:
            raise RuntimeError("the batcher is not started")
        if self._closing:
            raise Overloaded("the server is shutting down")
        if self.queued_samples + len(samples) > self.max_queue:
            raise Overloaded(f"{self.queued_samples} samples are waiting (the queue holds {self.max_queue})")
        key = tuple(tuple(t.shape) for t in samples[0])
        item = Item(samples, key, asyncio.get_running_loop().create_future())
        self.queue.append(item)
        self.queued_samples += len(samples)
        self.stats.requests += 1
        self._wake.set()
        return await item.future

    def _take(self) -> list[Item]:
        """The oldest live item and the queued items that fit with it (same key, up to max_batch samples)."""
        while self.queue and self.queue[0].future.done():  # its caller gave up
            dead = self.queue.popleft()
            self.queued_samples -= len(dead.samples)
            self.stats.skipped += 1
        if not self.queue:
            return []
        first = self.queue.popleft()
        self.queued_samples -= len(first.samples)
        taken, total = [first], len(first.samples)
        if total >= self.max_batch:
            return taken
        keep: collections.deque[Item] = collections.deque()
        while self.queue and total < self.max_batch:
            item = self.queue.popleft()
            if item.future.done():
                self.queued_samples -= len(item.samples)
                self.stats.skipped += 1
            elif item.key == first.key and total + len(item.samples) <= self.max_batch:
                self.queued_samples -= len(item.samples)
                taken.append(item)
                total += len(item.samples)
            else:
                keep.append(item)
                if item.key == first.key:  # the next same-shape item does not fit: keep arrival order
                    break
        keep.extend(self.queue)
        self.queue = keep
        return taken

    def _queued_like(self, key: tuple[tuple[int, ...], ...]) -> int:
        return sum(len(i.samples) for i in self.queue if i.key == key and not i.future.done())

    async def _run(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.max_wait_s > 0 and not self._closing:
                head = self.queue[0]
                deadline = head.queued + self.max_wait_s
                while self._queued_like(head.key) < self.max_batch and not self._closing:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), left)
                    except asyncio.TimeoutError:
                        break
            items = self._take()
            if not items:
                continue
            try:
                for chunk in _chunks(items, self.max_batch):
                    await self._run_batch(loop, chunk)
            except Exception:  # pragma: no cover - _run_batch reports errors to the callers
                log.exception("batch failed")

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, chunk: list[tuple[Item, int, int]]) -> None:
        rows = [s for item, a, b in chunk for s in item.samples[a:b]]
        n = len(rows)
        try:
            known = self.forward_s if self.forward_s is not None else float("inf")
            lone = len(chunk) == 1 and not self.queue and known < self.idle_inline_below_s and self.idle()
            if known < self.inline_below_s or lone:
                encoded = self._forward(rows)
            else:
                encoded = await loop.run_in_executor(self._pool, self._forward, rows)
        except Exception as exc:
            self.stats.errors += 1
            for item, _, _ in chunk:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        self.stats.batches += 1
        self.stats.samples += n
        self.stats.batch_sizes[n] += 1
        self.stats.largest_batch = max(self.stats.largest_batch, n)
        at = 0
        for item, a, b in chunk:
            part = encoded[at : at + (b - a)]
            at += b - a
            if item.future.done():
                continue
            if b == len(item.samples) and a == 0:
                item.future.set_result(part)
            else:  # one piece of a request larger than max_batch
                item.parts.extend(part)
                if b == len(item.samples):
                    item.future.set_result(item.parts)

    def _forward(self, rows: list[list[torch.Tensor]]) -> list[bytes]:
        t0 = time.perf_counter()
        n = len(rows)
        inputs = [torch.stack([r[i] for r in rows]) for i in range(len(rows[0]))]
        out = self.forward(inputs, n)
        self.note_forward(time.perf_counter() - t0)
        return out


def _chunks(items: list[Item], size: int) -> list[list[tuple[Item, int, int]]]:
    """Split items into batches of at most ``size`` samples: (item, start, end) slices, in order."""
    out: list[list[tuple[Item, int, int]]] = []
    cur: list[tuple[Item, int, int]] = []
    room = size
    for item in items:
        a = 0
        while a < len(item.samples):
            b = min(len(item.samples), a + room)
            cur.append((item, a, b))
            room -= b - a
            a = b
            if room == 0:
                out.append(cur)
                cur, room = [], size
    if cur:
        out.append(cur)
    return out
