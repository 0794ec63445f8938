"""``choline.find_batch_size``: the largest batch that fits in memory, with room to spare.

It runs real training steps (forward, backward, optimizer step) on batches made of the dataset's **largest**
samples, doubling the batch size until a step runs out of memory, then binary-searches the edge. "Out of
memory" is:

* on a CUDA device: ``torch.cuda.OutOfMemoryError``, or a peak of reserved memory (``max_memory_reserved``,
  what the caching allocator really holds, fragmentation included) above the memory that was free on the
  device when the search started;
* on the CPU: a peak above ``memory_budget``, measured as the process's peak resident set size
  (``VmHWM``, reset before each trial through ``/proc/self/clear_refs``) minus its size before the trial,
  less the code pages the trial loaded for the first time: every page of data the step touched, from any
  allocator (Linux only). glibc would keep freed memory of a trial around and hand it to the next one, so
  that the same step measures anywhere from 80 to 130 MB; the search therefore fixes glibc's mmap threshold
  at 128 KiB (``mallopt``) for the rest of the process: every tensor's memory then comes from the system and
  goes back on free, and a step measures the same each time (and training uses what was measured).

The answer keeps ``headroom`` (10 % by default) **of the memory**, not of the batch size: it is the largest
batch whose measured peak is at most ``(1 - headroom) * limit`` (estimated from a straight line through the
trials, then checked by one more trial). The edge itself is the size that would run out the first time the
allocator fragments or a longer sample comes along, which is why finders that return it (Lightning's)
produce batch sizes that fail later.

The model, the optimizer and every random generator are restored afterwards: the search leaves no trace on
training. The result is recorded in the run (``run.json``, every checkpoint), and the Trainer reuses it when
it resumes instead of searching again (a different batch size would break an exact resume).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from choline_core.errors import UserError

from . import rng

log = logging.getLogger("choline.train")

DEFAULT_HEADROOM = 0.10
MAX_TRIALS = 24


@dataclass
class BatchSizeResult:
    batch_size: int  # the answer: fits with ``headroom`` to spare
    edge: int  # the largest size that fit the limit at all
    limit_bytes: int  # the memory a step may use
    peak_bytes: int  # the answer's measured peak
    headroom: float
    device: str
    capped: bool = False  # the search reached ``max_batch_size`` before running out of memory
    largest_samples: bool = True  # trials used the largest samples
    trials: list[dict[str, Any]] = field(default_factory=list)  # batch_size, fits, peak_bytes, note
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        mb = 1024 * 1024
        return (
            f"batch size {self.batch_size} (edge {self.edge}{', capped' if self.capped else ''}; peak "
            f"{self.peak_bytes / mb:.0f} MB of {self.limit_bytes / mb:.0f} MB, {self.headroom:.0%} kept free)"
        )


# ===================================================================================== measuring
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3}
_UNITS.update({"kib": 1024, "mib": 1024**2, "gib": 1024**3, "t": 1024**4, "tb": 1024**4, "tib": 1024**4})


def parse_bytes(value: int | float | str) -> int:
    """``2_000_000``, ``"512MB"``, ``"1.5 GiB"`` -> bytes (binary units)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise UserError(f"memory budget {value!r} must be positive")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"memory budget {value!r} is not a size", hint="e.g. 2GB, 512MiB or a number of bytes")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise UserError(f"memory budget {value!r} must be positive")
    return n


def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field_name} missing from /proc/self/status")


def _trim(full: bool = False) -> None:
    """Give freed heap memory back to the system (glibc), so one trial's leftovers do not count in the next.
    (A full garbage collection takes 0.1 s or more in a process that imported torch: only the young
    generations are collected between trials.)"""
    gc.collect() if full else gc.collect(1)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024


def _fix_mmap_threshold() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


class _CpuMeter:
    """Peak resident memory of this process during a block, above what it held at the block's start."""

    def __init__(self) -> None:
        if not sys.platform.startswith("linux"):
            raise UserError(
                "a CPU memory budget is measured through /proc/self (Linux only)",
                hint="search on the GPU, or pass batch sizes by hand on this system",
            )
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError as exc:
            raise UserError(f"cannot reset the peak memory counter (/proc/self/clear_refs: {exc})") from None
        _fix_mmap_threshold()

    def start(self) -> None:
        _trim()
        self.base = _status_kb("VmRSS")
        self.files = _status_kb("RssFile")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # VmHWM := VmRSS

    def peak(self) -> int:
        code = max(0, _status_kb("RssFile") - self.files)  # library pages mapped in for the first time
        return max(0, _status_kb("VmHWM") - self.base - code)


class _CudaMeter:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        gc.collect(1)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_reserved(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return max(0, torch.cuda.max_memory_reserved(self.device) - self.base)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in text.lower() or "can't allocate memory" in text
    )


# ===================================================================================== samples
def _numel(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel()
    if isinstance(x, Mapping):
        return sum(_numel(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_numel(v) for v in x)
    np_size = getattr(x, "size", None)
    if isinstance(np_size, int):
        return np_size
    if isinstance(x, (str, bytes)):
        return len(x)
    return 1


def largest_first(dataset: Any, size_fn: Callable[[Any], float] | None = None, scan: int = 20_000) -> list[int]:
    """Indices of ``dataset`` by sample size, largest first (``size_fn(sample)``; default: elements in its
    tensors). Datasets longer than ``scan`` are measured on an evenly spread subset of ``scan`` samples."""
    n = len(dataset)
    if n == 0:
        raise UserError("the dataset is empty: nothing to size a batch with")
    idx = list(range(n)) if n <= scan else [int(i * n / scan) for i in range(scan)]
    fn = size_fn or _numel
    sizes = [(float(fn(dataset[i])), i) for i in idx]
    sizes.sort(key=lambda t: (-t[0], t[1]))
    return [i for _, i in sizes]


# ===================================================================================== the search
def _default_step(
    model: nn.Module, loss_fn: Callable[..., torch.Tensor] | None, optimizer: torch.optim.Optimizer | None
) -> Callable[[Any], None]:
    def step(batch: Any) -> None:
        if isinstance(batch, (list, tuple)) and len(batch) >= 2 and loss_fn is not None:
            *inputs, target = batch
            loss = loss_fn(model(*inputs), target)
        else:
            out = model(*batch) if isinstance(batch, (list, tuple)) else model(batch)
            loss = loss_fn(out) if loss_fn is not None else out.float().mean()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def find_batch_size(
    model: nn.Module,
    dataset: Any,
    *,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    step: Callable[[Any], Any] | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    device: str | torch.device | None = None,
    memory_budget: int | float | str | None = None,
    headroom: float = DEFAULT_HEADROOM,
    start: int = 1,
    max_batch_size: int | None = None,
    multiple_of: int = 1,
    size_fn: Callable[[Any], float] | None = None,
    scan: int = 20_000,
    run: Any = None,
) -> BatchSizeResult:
    """The largest batch size whose training step fits in memory with ``headroom`` to spare.

    ``dataset``: a map-style dataset (``len`` and indexing); trials use its largest samples. ``step(batch)``
    runs one training step; by default ``loss_fn(model(*inputs), target).backward()`` and ``optimizer.step()``
    for ``(inputs..., target)`` batches. ``memory_budget`` (bytes or ``"2GB"``): the memory a step may use on
    top of what the process holds; required on the CPU, optional on a GPU (default: the device's free
    memory). ``max_batch_size`` defaults to the dataset's length. The result is recorded in ``run`` (default:
    the current run).
    """
    if not 0 <= headroom < 1:
        raise UserError(f"headroom={headroom!r} must be in [0, 1)")
    if start < 1 or multiple_of < 1:
        raise UserError("start and multiple_of must be at least 1")
    t0 = time.monotonic()
    dev = torch.device(device) if device is not None else next(model.parameters(), torch.zeros(0)).device
    meter: _CpuMeter | _CudaMeter
    if dev.type == "cuda":
        meter = _CudaMeter(dev)
        free, _total = torch.cuda.mem_get_info(dev)
        slack = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        limit = parse_bytes(memory_budget) if memory_budget is not None else int(free + slack)
    else:
        if memory_budget is None:
            raise UserError(
                "find_batch_size on the CPU needs memory_budget (what a training step may use, e.g. '4GB')",
                hint="on a GPU the device's free memory is the limit",
            )
        meter = _CpuMeter()
        limit = parse_bytes(memory_budget)
    if collate_fn is None:
        from torch.utils.data._utils.collate import default_collate

        collate_fn = default_collate
    order = largest_first(dataset, size_fn, scan)
    top = max_batch_size if max_batch_size is not None else len(dataset)
    if top < start:
        raise UserError(f"max_batch_size {top} is below start {start}")
    run_step = step or _default_step(model, loss_fn, optimizer)

    saved_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
    saved_rng = rng.capture()
    was_training = model.training
    trials: list[dict[str, Any]] = []
    measured: dict[int, int] = {}

    def trial(b: int, note: str = "") -> bool:
        picks = [order[i % len(order)] for i in range(b)]
        batch: Any = None
        try:
            batch = _to(collate_fn([dataset[i] for i in picks]), dev)
            model.train()
            meter.start()
            run_step(batch)
            peak = meter.peak()
            fits = peak <= limit
            measured[b] = peak
            trials.append({"batch_size": b, "fits": fits, "peak_bytes": peak, "note": note})
            return fits
        except BaseException as exc:
            if not _is_oom(exc):
                raise
            trials.append({"batch_size": b, "fits": False, "peak_bytes": None, "note": f"out of memory: {exc}"[:200]})
            return False
        finally:
            batch = None
            if optimizer is not None and saved_opt is not None:
                optimizer.zero_grad(set_to_none=True)
                optimizer.load_state_dict(copy.deepcopy(saved_opt))
            for p in model.parameters():
                p.grad = None
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            _trim()

    def predicted(b: int) -> float | None:
        """A straight line through the two largest measured trials that fit (None: not enough yet)."""
        pts = sorted((k, v) for k, v in measured.items() if v <= limit)
        if len(pts) < 2:
            return None
        (b1, p1), (b2, p2) = pts[-2], pts[-1]
        if b2 == b1:
            return None
        slope = (p2 - p1) / (b2 - b1)
        return p2 + slope * (b - b2)

    def round_down(b: int) -> int:
        return max(start, (b // multiple_of) * multiple_of) if b >= multiple_of else b

    _trim(full=True)
    try:
        trial(start, "warm-up")  # the first step maps code and sets up kernels: not what later ones take
        measured.clear()
        if not trial(start, "start"):
            need = measured.get(start)
            raise UserError(
                f"even a batch of {start} does not fit: "
                + (f"its step needs {need / 2**20:.0f} MB, " if need is not None else "it ran out of memory, ")
                + f"the limit is {limit / 2**20:.0f} MB",
                hint="raise memory_budget, or make the model or its samples smaller",
            )
        good, bad = start, None
        b = start
        while bad is None and good < top and len(trials) < MAX_TRIALS:
            b = min(top, max(good + 1, good * 2))
            guess = predicted(b)
            if guess is not None and guess > 1.5 * limit:
                bad = b  # far beyond the limit on the line so far: do not allocate it to find out
                trials.append({"batch_size": b, "fits": False, "peak_bytes": None, "note": "predicted"})
                break
            if trial(b, "grow"):
                good = b
            else:
                bad = b
        capped = bad is None and good >= top
        while bad is not None and bad - good > multiple_of and len(trials) < MAX_TRIALS:
            mid = (good + bad) // 2
            if trial(mid, "search"):
                good = mid
            else:
                bad = mid
        edge = good
        target = (1.0 - headroom) * limit
        choice = round_down(edge)
        if measured.get(choice, 0) > target:
            line = predicted(choice)
            pts = sorted((k, v) for k, v in measured.items() if v <= limit)
            if line is not None and len(pts) >= 2:
                (b1, p1), (b2, p2) = pts[-2], pts[-1]
                slope = (p2 - p1) / (b2 - b1) if b2 != b1 else 0.0
                est = b2 + (target - p2) / slope if slope > 0 else choice
                choice = round_down(max(start, min(edge, math.floor(est))))
            else:
                choice = round_down(max(start, int(edge * (1.0 - headroom))))
            for _ in range(6):
                if choice in measured and measured[choice] <= target:
                    break
                if choice not in measured and trial(choice, "headroom") and measured[choice] <= target:
                    break
                if choice <= start:
                    break
                choice = round_down(max(start, int(choice * 0.9)))
        peak = measured.get(choice, 0)
    finally:
        model.load_state_dict(saved_model)
        if optimizer is not None and saved_opt is not None:
            optimizer.load_state_dict(saved_opt)
        rng.restore(saved_rng)
        model.train(was_training)
        _trim(full=True)

    result = BatchSizeResult(
        batch_size=choice,
        edge=edge,
        limit_bytes=int(limit),
        peak_bytes=int(peak),
        headroom=headroom,
        device=str(dev),
        capped=capped,
        largest_samples=True,
        trials=trials,
        seconds=time.monotonic() - t0,
    )
    log.info("batch-size search: %s after %d trials in %.1fs", result, len(trials), result.seconds)
    record(result, run)
    return result


def record(result: BatchSizeResult, run: Any = None) -> None:
    """Put the result in the run: ``run.records["batch_size"]`` (saved with every checkpoint) and ``run.json``."""
    if run is None:
        from .run import current_run

        run = current_run()
    if run is None:
        return
    summary = {k: v for k, v in result.to_json().items() if k != "trials"}
    summary["trials"] = len(result.trials)
    run.records["batch_size"] = summary
    if run.is_main:
        path = run.dir / "run.json"
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            meta = {}
        meta["batch_size_search"] = result.to_json()
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        os.replace(tmp, path)
        run.log({"batch_size": float(result.batch_size)})


__all__: Sequence[str] = ["BatchSizeResult", "find_batch_size", "largest_first", "parse_bytes"]
