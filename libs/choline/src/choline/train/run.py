"""``choline.init()`` and the ``Run`` it returns: config, metric logging, epochs, checkpoints, restore.

A run lives in a folder (``$CHOLINE_RUN_DIR``, default ``./choline-runs/<run id>/``)::

    run.json          id, name, project, config, and one record per attempt (process start)
    metrics.jsonl     one JSON object per metric point: seq, step, key, value, epoch, attempt, ts
    checkpoints/<step>/
    controls.jsonl    one record per control command (pause, stop, set ...): where it took effect, or why not
    control/          the local control channel: a command file dropped here is applied at the next poll point

Under the worker-agent (``CHOLINE_AGENT_SOCKET`` set) global rank 0 also streams everything to the agent
over its Unix socket (``choline_core.agent_protocol``) and deletes a local checkpoint only once the agent
says it is uploaded. Under ``torchrun`` only global rank 0 writes files or talks to the agent; every rank
takes part in checkpoints (their RNG states are gathered) and restores.

The library counts its own **global step**: the Trainer advances it once per optimizer step; in a loop of
your own, each batch drawn from a ``run.loader(...)`` advances it (or call ``run.advance()``). Every metric
point carries it, whatever ``step=`` you pass to ``log``.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from choline_core import agent_protocol as proto
from choline_core.errors import UserError

from . import rng
from .agent import AgentLink, socket_path_ok
from .checkpoint import CheckpointWriter, Written, checkpoint_steps, load_checkpoint, newest_valid
from .control import CONTROL_LOG, Controls
from .data import Loader
from .serialize import CheckpointError, check_key

log = logging.getLogger("choline.train")

LIBRARY_STATE = "_choline"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
STATUS_EVERY = 10.0  # seconds between periodic status messages to the agent

_current: Run | None = None


def _version() -> str:
    from choline import __version__

    return __version__


class Config(dict[str, Any]):
    """The run's configuration: a dict that also reads as attributes (``run.config.lr``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:40]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} is not an integer") from None


def _dist() -> tuple[int, int, bool]:
    """(rank, world size, process group initialized)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), True
    return _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), False


def _to_float(key: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"run.log: {key!r} is a tensor of {value.numel()} elements; log a number")
        return float(value.detach().item())
    if isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"run.log: {key!r} is a {type(value).__name__}, not a number") from None


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, allow_nan=False))
    os.replace(tmp, path)


class Run:
    """One process's view of a run. Make it with ``choline.init()``."""

    def __init__(
        self,
        *,
        config: Mapping[str, Any] | None,
        name: str | None,
        project: str | None,
        run_id: str | None,
        run_dir: str | os.PathLike[str] | None,
        seed: int | None,
        threads: int | None,
        resume: bool | str,
        keep: int | None,
        max_local: int | None,
        async_checkpoints: bool,
    ) -> None:
        if resume not in (True, False, "auto"):
            raise UserError(f"resume={resume!r}: use True, False or 'auto'")
        self.rank, self.world_size, _ = _dist()
        self.is_main = self.rank == 0
        env_id = os.environ.get(proto.ENV_RUN_ID)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.id = env_id or run_id or f"{_slug(name or 'run') or 'run'}-{stamp}-{secrets.token_hex(2)}"
        self.name = name or self.id
        self.project = project
        self.dir = Path(run_dir or os.environ.get(proto.ENV_RUN_DIR) or Path.cwd() / "choline-runs" / self.id).resolve()
        self.data_dir = Path(os.environ[proto.ENV_DATA_DIR]) if os.environ.get(proto.ENV_DATA_DIR) else None
        cfg = dict(config or {})
        try:
            json.dumps(cfg, allow_nan=True)
        except (TypeError, ValueError) as exc:
            raise UserError(f"choline.init: config must hold JSON values ({exc})") from None
        self.config = Config(cfg)
        self.seed = seed
        self.agent_socket = os.environ.get(proto.ENV_AGENT_SOCKET) or None
        self.under_agent = self.agent_socket is not None
        self.keep = keep if keep is not None else (1 if self.under_agent else 3)
        self.max_local = max_local if max_local is not None else _env_int("CHOLINE_MAX_LOCAL_CHECKPOINTS", 4)
        if self.keep < 1 or self.max_local < self.keep:
            raise UserError("keep must be at least 1 and max_local at least keep")

        self.step = 0
        self.epoch = 0
        self.total_epochs: int | None = None
        self.epochs_set: int | None = None  # the total a control command set (kept across resumes)
        self.records: dict[str, Any] = {}  # small facts saved with every checkpoint (batch-size search ...)
        self.restored_records: dict[str, Any] = {}
        self._checkpointed_at: int | None = None
        self._start_epoch = 0
        self._in_epochs = False
        self._loaders: dict[str, Loader] = {}
        self._train_loader: str | None = None
        self._pending_loader_states: dict[str, Any] = {}
        self._latest: dict[str, float] = {}
        self._seq = 0
        self._last_status = 0.0
        self._started_from: int | None = None  # the step this attempt's history starts from, once known
        self.resumed = False
        self._restore_done = False
        self._moved = False  # the step advanced or a checkpoint was taken in this process
        self._failed = False
        self._previous_excepthook: Any = None
        self.finished = False
        self._lock = threading.Lock()
        self._uploaded: set[int] = set()
        self._backlog_deleted = 0  # checkpoints deleted unconfirmed (disk bound): warned about once
        self._announced: dict[int, proto.CheckpointReady] = {}

        # -- which checkpoint to resume from
        resume_manifest: proto.CheckpointManifest | None = None
        self.resume_path: Path | None = None
        self.resume_step: int | None = None
        resume_from = os.environ.get(proto.ENV_RESUME_FROM)
        ckpt_root = self.dir / CHECKPOINTS
        if resume_from:
            path = Path(resume_from).resolve()
            try:
                manifest = proto.verify_checkpoint(path)
            except proto.IncompleteCheckpoint as exc:
                raise CheckpointError(
                    f"{proto.ENV_RESUME_FROM} names a checkpoint that is not complete: {exc}",
                    hint="the agent must download every file and the manifest before starting the script",
                ) from None
            self.resume_path, self.resume_step, resume_manifest = path, manifest.step, manifest
        elif resume and self.is_main:
            found = newest_valid(ckpt_root)
            if found is not None:
                self.resume_path, self.resume_step, resume_manifest = found[0], found[1].step, found[1]
            elif resume is True and checkpoint_steps(ckpt_root):
                raise CheckpointError(f"no complete checkpoint under {ckpt_root} (every one is damaged)")
        elif not resume and self.is_main and checkpoint_steps(ckpt_root):
            raise UserError(
                f"{self.dir} already holds checkpoints and resume=False",
                hint="pass resume='auto' to carry on, or choose another run directory",
            )

        # -- threads (CPU results depend on how reductions split between threads) and seeds
        saved_threads = (resume_manifest.extra.get("threads") if resume_manifest else None) or None
        if threads is None and saved_threads and self.world_size == 1 and not os.environ.get("CHOLINE_NUM_THREADS"):
            threads = int(saved_threads)  # the checkpoint's count, so the resumed run computes the same numbers
        self.threads = rng.set_threads(threads)
        if seed is not None:
            rng.seed_everything(seed)

        # -- attempt number, run.json, metrics.jsonl (rank 0 only)
        self.attempt = _env_int(proto.ENV_ATTEMPT, 0)
        self._metrics_fh = None
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            meta = self._read_run_file()
            attempts = meta.get("attempts", [])
            if not self.attempt:
                self.attempt = 1 + max((int(a.get("attempt", 0)) for a in attempts), default=0)
            attempts = [a for a in attempts if a.get("attempt") != self.attempt]
            attempts.append(
                {
                    "attempt": self.attempt,
                    "started": time.time(),
                    "pid": os.getpid(),
                    "resumed_from_step": self.resume_step or 0,
                    "checkpoint": str(self.resume_path) if self.resume_path else None,
                }
            )
            meta.update(
                run_id=self.id,
                name=self.name,
                project=self.project,
                config=_jsonable(self.config),
                attempts=attempts,
                library_version=_version(),
                world_size=self.world_size,
            )
            _write_json_atomic(self.dir / RUN_FILE, meta)
            self._metrics_fh = open(self.dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        self.attempt = self.attempt or 1

        self.controls = Controls(self)
        self._writer: CheckpointWriter | None = None
        if self.is_main:
            self._writer = CheckpointWriter(ckpt_root, asynchronous=async_checkpoints, on_written=self._on_written)

        self._link: AgentLink | None = None
        if self.is_main and self.agent_socket:
            if not socket_path_ok(self.agent_socket):
                raise UserError(f"{proto.ENV_AGENT_SOCKET} is longer than a Unix socket path may be (107 bytes)")
            hello = proto.Hello(
                pid=os.getpid(),
                rank=self.rank,
                world_size=self.world_size,
                library_version=_version(),
                run_id=self.id,
                attempt=self.attempt,
            )
            self._link = AgentLink(
                self.agent_socket, hello, on_uploaded=self._on_uploaded, on_connect=self._unconfirmed_checkpoints
            )
        self.status("starting")
        atexit.register(self._atexit)
        self._install_excepthook()
        log.info(
            "choline run %s (attempt %d) in %s%s",
            self.id,
            self.attempt,
            self.dir,
            f", resuming from step {self.resume_step}" if self.resume_step is not None else "",
        )

    # ======================================================================================= files
    def _read_run_file(self) -> dict[str, Any]:
        try:
            data = json.loads((self.dir / RUN_FILE).read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _record_start(self, step: int) -> None:
        """Record where this attempt's history starts (for the one-history rule); rank 0 only."""
        if self._started_from == step or not self.is_main:
            self._started_from = step
            return
        self._started_from = step
        meta = self._read_run_file()
        for a in meta.get("attempts", []):
            if a.get("attempt") == self.attempt:
                a["resumed_from_step"] = step
        _write_json_atomic(self.dir / RUN_FILE, meta)

    # ======================================================================================= logging
    def log(self, data: Mapping[str, Any], step: int | None = None) -> None:
        """Record metric values at the current global step (``step=`` is kept as ``user_step`` only)."""
        if not self.is_main or not data:
            return
        if self._started_from is None:
            self._record_start(self.step if self.resumed else 0)
        now = time.time()
        points = []
        lines = []
        for key, raw_value in data.items():
            if raw_value is None:
                continue
            value = _to_float(key, raw_value)
            enc, raw = proto.encode_value(value)
            point = proto.MetricPoint(
                seq=self._seq,
                step=self.step,
                key=str(key),
                value=enc,
                raw=raw,
                epoch=self.epoch,
                ts=now,
                attempt=self.attempt,
                user_step=step,
            )
            self._seq += 1
            self._latest[str(key)] = value
            points.append(point)
            lines.append(json.dumps(point.model_dump(mode="json", exclude_none=True), allow_nan=False))
        if self._metrics_fh is not None and lines:
            self._metrics_fh.write("\n".join(lines) + "\n")
            self._metrics_fh.flush()
        if self._link is not None and points:
            self._link.send(proto.Metrics(points=points))

    @property
    def summary(self) -> dict[str, float]:
        """The latest value logged for each key."""
        return dict(self._latest)

    def status(self, phase: str, detail: str | None = None) -> None:
        if self._link is not None:
            self._link.send(proto.Status(phase=phase, step=self.step, epoch=self.epoch, detail=detail))
            self._last_status = time.monotonic()

    def artifact(self, path: str | os.PathLike[str], name: str | None = None) -> None:
        """Ask for a file or folder to be brought back with the run's outputs (under the agent)."""
        p = Path(path).resolve()
        if not p.exists():
            raise UserError(f"run.artifact: {p} does not exist")
        if self._link is not None:
            self._link.send(proto.Artifact(path=str(p), name=name))
        elif self.is_main:
            log.info("artifact %s (kept in place: no agent)", p)

    # ======================================================================================= steps and epochs
    def advance(self, n: int = 1) -> int:
        """Move the global step on by ``n`` (the Trainer does this once per optimizer step)."""
        self.step += n
        self._moved = True
        if self._link is not None and time.monotonic() - self._last_status > STATUS_EVERY:
            self.status("training")
        return self.step

    def _advance_one(self) -> None:
        self.advance()

    def epochs(self, n: int) -> Iterator[int]:
        """``for epoch in run.epochs(n)``: epochs ``start..n-1``, where ``start`` is where a restore left off."""
        self.total_epochs = self.epochs_set if self.epochs_set is not None else int(n)
        e = self._start_epoch
        self._in_epochs = True
        try:
            while self.total_epochs is not None and e < self.total_epochs and not self.controls.should_stop:
                self.epoch = e
                for loader in self._loaders.values():
                    loader.set_epoch(e)
                yield e
                if self.controls.should_stop:
                    return
                e += 1
                self._start_epoch = e
        finally:
            self._in_epochs = False

    def loader(self, dataset: Any, *, name: str | None = None, train: bool = True, **kwargs: Any) -> Loader:
        """A resumable ``Loader`` saved in checkpoints; a ``train`` loader advances the global step per batch."""
        kwargs.setdefault("seed", self.seed or 0)
        ld = Loader(dataset, **kwargs)
        self.track(ld, name=name, train=train, counts_steps=train)
        return ld

    def track(self, loader: Loader, *, name: str | None = None, train: bool = True, counts_steps: bool = False) -> None:
        """Save ``loader``'s position in checkpoints (and restore it). The first ``train`` loader defines epochs."""
        if name is None:
            name = "train" if train and self._train_loader is None else f"loader{len(self._loaders)}"
        self._loaders[name] = loader
        if train and self._train_loader is None:
            self._train_loader = name
        loader.on_batch = self._advance_one if counts_steps else None
        if counts_steps:
            loader.before_batch = self._before_batch
            self.controls.install_signal()
        state = self._pending_loader_states.pop(name, None)
        if state is not None:
            loader.load_state_dict(state)

    def _before_batch(self) -> bool:
        """A ``run.loader`` loop's poll point (before each batch is fetched); True ends the epoch early (stop)."""
        self.controls.poll()
        return self.controls.should_stop

    def _next_epoch(self) -> int:
        """The epoch a restore of a checkpoint taken now starts with."""
        name = self._train_loader
        if name is not None:
            return max(self.epoch, self._loaders[name].epoch)
        return self.epoch + 1 if self._in_epochs else self.epoch

    # ======================================================================================= checkpoints
    def prepare_checkpoint(self, state: Mapping[str, Any]) -> None:
        """Allocate checkpoint buffers for ``state`` in the background (the Trainer calls this at the start)."""
        if self._writer is not None:
            self._writer.prepare(dict(state))

    def checkpoint(
        self, state: Mapping[str, Any] | None = None, *, reason: str = "periodic", wait: bool = False
    ) -> float:
        """Checkpoint ``state`` (values with ``state_dict()`` are asked for it) plus everything needed to resume.

        Call it where the loop can continue right after: as the last thing in a batch's body or an epoch's
        body. Returns the seconds training was held (the copy into CPU memory); the files are written in the
        background. Under ``torchrun`` every rank must call it at the same point.
        """
        if reason not in proto.CHECKPOINT_REASONS:
            raise UserError(f"checkpoint reason {reason!r}: use one of {', '.join(proto.CHECKPOINT_REASONS)}")
        state = dict(state or {})
        for key in state:
            check_key(key)
        self._moved = True
        rng_states = self._gather_rng()
        if self._writer is None:
            self._checkpointed_at = self.step
            return 0.0
        lib = {
            "step": self.step,
            "epoch": self.epoch,
            "next_epoch": self._next_epoch(),
            "total_epochs": self.total_epochs,
            "seed": self.seed,
            "threads": self.threads,
            "world_size": self.world_size,
            "attempt": self.attempt,
            "config": _jsonable(self.config),
            "rng": rng_states,
            "loaders": {name: ld.state_dict() for name, ld in self._loaders.items()},
            "controls": self.controls.state_dict(),
            "epochs_set": self.epochs_set,
            "records": _jsonable(self.records),
        }
        self._checkpointed_at = self.step
        state[LIBRARY_STATE] = lib
        metrics = {k: (v if math.isfinite(v) else None) for k, v in self._latest.items()}
        stall = self._writer.save(
            self.step,
            state,
            {
                "run_id": self.id,
                "attempt": self.attempt,
                "epoch": self.epoch,
                "reason": reason,
                "metrics": metrics,
                "library_version": _version(),
                "extra": {"threads": self.threads, "world_size": self.world_size},
            },
        )
        if wait:
            self.wait()
        return stall

    def _gather_rng(self) -> list[dict[str, Any]]:
        mine = rng.capture()
        import torch.distributed as dist

        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
            dist.gather_object(mine, gathered, dst=0)
            return list(gathered or [])
        return [mine]

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the checkpoint being written in the background."""
        return self._writer.wait(timeout) if self._writer is not None else True

    @property
    def checkpoint_stalls(self) -> list[float]:
        return list(self._writer.stalls) if self._writer is not None else []

    def restore(self, into: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """Load the checkpoint this run resumes from; ``None`` when it starts fresh.

        Objects in ``into`` are loaded in place (``load_state_dict``; dicts and lists updated). The library's
        own state comes back too: global step, epoch, tracked loaders' positions, every RNG (last, so that
        nothing drawn while loading shifts them). Returns the saved state (state dicts, plain values).
        """
        if self._restore_done and self._moved:
            return None  # training went on since: a second fit() carries on from where the first stopped
        self._restore_done = True
        path = self._broadcast_resume_path()
        if path is None:
            if self._started_from is None:
                self._record_start(0)
            return None
        tree = load_checkpoint(path)
        lib = tree.pop(LIBRARY_STATE)
        for key, obj in (into or {}).items():
            if key not in tree:
                raise CheckpointError(f"the checkpoint at {path} has no {key!r}", hint=f"it holds {sorted(tree)}")
            _load_into(obj, tree[key], key)
        self.step = int(lib["step"])
        self.epoch = int(lib["epoch"])
        self._start_epoch = int(lib["next_epoch"])
        if lib.get("epochs_set") is not None:
            self.epochs_set = int(lib["epochs_set"])
            self.total_epochs = self.epochs_set
        if lib.get("total_epochs") is not None and self.total_epochs is None:
            self.total_epochs = int(lib["total_epochs"])
        self.restored_records = dict(lib.get("records") or {})
        self.records.update(self.restored_records)
        self.controls.load_state_dict(lib.get("controls"), self.step)
        for name, state in lib.get("loaders", {}).items():
            if name in self._loaders:
                self._loaders[name].load_state_dict(state)
            else:
                self._pending_loader_states[name] = state
        saved_cfg = lib.get("config") or {}
        changed = sorted(k for k in set(saved_cfg) | set(self.config) if saved_cfg.get(k) != self.config.get(k))
        if changed:
            log.warning("config differs from the checkpoint's in %s; using the new values", ", ".join(changed))
        saved_threads = lib.get("threads")
        if saved_threads and saved_threads != self.threads:
            log.warning(
                "the checkpoint was made with %s torch threads, this process uses %s: results may drift in the "
                "last bits",
                saved_threads,
                self.threads,
            )
        states = lib.get("rng") or []
        if states:
            if len(states) != self.world_size:
                log.warning("the checkpoint has RNG states of %d processes, this run %d", len(states), self.world_size)
            rng.restore(states[self.rank % len(states)])
        self.resumed = True
        self.resume_step = self.step
        self._record_start(self.step)
        self.status("restored")
        log.info("restored step %d (epoch %d) from %s", self.step, self._start_epoch, path)
        return tree

    def _broadcast_resume_path(self) -> Path | None:
        import torch.distributed as dist

        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            box: list[Any] = [str(self.resume_path) if self.resume_path else None]
            dist.broadcast_object_list(box, src=0)
            return Path(box[0]) if box[0] else None
        return self.resume_path

    # ======================================================================================= the agent hand-off
    def _on_written(self, written: Written) -> None:
        msg = proto.CheckpointReady(
            step=written.step,
            dir=str(written.path),
            reason=written.manifest.reason,
            epoch=written.manifest.epoch,
            metrics=dict(written.manifest.metrics),
        )
        with self._lock:
            self._announced[written.step] = msg
        if self._link is not None:
            self._link.send(msg)
        self._apply_retention()

    def _on_uploaded(self, step: int) -> None:
        with self._lock:
            self._uploaded.add(step)
        self._apply_retention()

    def _unconfirmed_checkpoints(self) -> list[proto.Message]:
        with self._lock:
            return [m for s, m in sorted(self._announced.items()) if s not in self._uploaded]

    def _apply_retention(self) -> None:
        """Local mode: keep the newest ``keep``. Under the agent: delete a checkpoint once uploaded, or once a
        newer one is (the agent uploads only the newest of a backlog: an older one is superseded), except the
        newest ``keep``; more than ``max_local`` folders and the oldest go even unconfirmed (disk bound)."""
        writer = self._writer
        if writer is None:
            return
        with self._lock:
            steps = sorted(checkpoint_steps(writer.root))  # oldest first
            keep = set(steps[-self.keep :])
            doomed: list[int] = []
            if not self.under_agent:
                doomed = [s for s in steps if s not in keep]
            else:
                newest_uploaded = max(self._uploaded, default=-1)
                doomed = [s for s in steps if s not in keep and (s in self._uploaded or s < newest_uploaded)]
                left = [s for s in steps if s not in doomed]
                while len(left) > self.max_local:
                    victim = left.pop(0)
                    self._backlog_deleted += 1
                    if self._backlog_deleted == 1:  # once per run: it says the same every time
                        log.warning(
                            "deleting checkpoint %d before the agent confirmed its upload: more than %d are waiting "
                            "(checkpoints come faster than they upload; the newest is uploaded first, so a recovery "
                            "loses little, but checkpointing less often wastes less)",
                            victim,
                            self.max_local,
                        )
                    else:
                        log.debug("deleting checkpoint %d before the agent confirmed its upload", victim)
                    doomed.append(victim)
            for s in doomed:
                writer.remove(s)
                self._announced.pop(s, None)

    # ======================================================================================= live control
    def bind(
        self,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        state: Mapping[str, Any] | Any = None,
    ) -> None:
        """Say what control commands act on: ``set lr`` on ``optimizer`` (and ``scheduler``'s base rates);
        ``pause`` checkpoints ``state`` (a mapping like ``run.checkpoint``'s, or a function returning one).
        The Trainer and the integrations bind themselves."""
        self.controls.bind(optimizer=optimizer, scheduler=scheduler, state=state)

    def poll(self) -> list[dict[str, Any]]:
        """Apply the control commands waiting now; returns their records. A ``run.loader`` loop and the
        Trainer poll by themselves. ``pause`` raises ``Paused`` (exit status 75) after its checkpoint;
        ``stop`` sets ``run.should_stop``."""
        return self.controls.poll()

    @property
    def should_stop(self) -> bool:
        """A ``stop`` command arrived: end the loop cleanly (``run.epochs`` and ``run.loader`` do by themselves)."""
        return self.controls.should_stop

    def control(self, action: str, **params: Any) -> str:
        """Send this run a command from the script itself (applied at the next poll point); returns its id."""
        return self.controls.submit(action, params)

    def on_set(self, key: str, fn: Any) -> None:
        """Handle ``choline set RUN KEY=VALUE`` for a setting of your own: ``fn(value)``, replayed on resume."""
        self.controls.on_set(key, fn)

    def _append_control_record(self, rec: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.dir / CONTROL_LOG, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(_jsonable(rec), sort_keys=True) + "\n")

    def _send_ack(self, rec: dict[str, Any]) -> None:
        if self._link is None:
            return
        self._link.send(
            proto.ControlAck(
                id=rec["id"],
                ok=rec["ok"],
                step=rec["step"],
                message=rec.get("message"),
                action=rec.get("action"),
                params=_jsonable(rec.get("params") or {}),
                tick=rec.get("tick"),
                epoch=rec.get("epoch"),
                effect=_jsonable(rec.get("effect") or {}),
                replay=bool(rec.get("replay")),
            )
        )

    def _log_mark(self, key: str, value: float, *, replay: bool) -> None:
        """A metric point marking a command in the history. A replay at the step this attempt resumed from is
        not logged again: the attempt that applied it first owns that step."""
        if replay and self.resumed and self.step == self.resume_step:
            return
        self.log({key: value})

    def _checkpoint_ok(self, step: int) -> bool:
        """The checkpoint of ``step`` this process asked for is complete on disk."""
        if self._writer is None:
            return True
        self._writer.wait()
        last = self._writer.last
        return last is not None and last.step == step and not self._writer.busy

    def pending_controls(self) -> list[proto.Control]:
        """Raw control commands the agent sent since the last call, for a loop that handles them itself.
        (The Trainer, ``run.loader`` loops and ``run.poll()`` act on them; once one has, they are gone.)"""
        out: list[proto.Control] = []
        if self._link is not None:
            while self._link.controls:
                out.append(self._link.controls.popleft())
        return out

    # ======================================================================================= the end
    def finish(self, phase: str = "finished") -> None:
        """Wait for the checkpoint in flight, close files and the agent connection. Idempotent."""
        global _current
        if self.finished:
            return
        self.finished = True
        self.controls.uninstall_signal()
        if self._writer is not None:
            self._writer.close()
        self.status(phase)
        if self._metrics_fh is not None:
            self._metrics_fh.close()
            self._metrics_fh = None
        if self._link is not None:
            self._link.close()
            self._link = None
        atexit.unregister(self._atexit)
        if self._previous_excepthook is not None and sys.excepthook is getattr(self, "_excepthook", None):
            sys.excepthook = self._previous_excepthook
        if _current is self:
            _current = None

    def _install_excepthook(self) -> None:
        """Remember an uncaught exception, so the agent hears ``failed`` rather than ``finished`` at exit."""
        previous = self._previous_excepthook = sys.excepthook

        def hook(exc_type: Any, exc: Any, tb: Any) -> None:
            self._failed = True
            previous(exc_type, exc, tb)

        self._excepthook = hook
        sys.excepthook = hook

    def _atexit(self) -> None:
        try:
            self.finish("failed" if self._failed else "finished")
        except Exception:  # pragma: no cover - best effort at interpreter exit
            log.exception("finishing the run at exit failed")

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish("failed" if exc_type is not None else "finished")

    def __repr__(self) -> str:
        return f"Run(id={self.id!r}, attempt={self.attempt}, step={self.step}, dir={str(self.dir)!r})"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _load_into(obj: Any, saved: Any, key: str) -> None:
    load = getattr(obj, "load_state_dict", None)
    if callable(load):
        load(saved)
    elif isinstance(obj, dict) and isinstance(saved, dict):
        obj.clear()
        obj.update(saved)
    elif isinstance(obj, list) and isinstance(saved, list):
        obj[:] = saved
    elif isinstance(obj, torch.Tensor) and isinstance(saved, torch.Tensor):
        with torch.no_grad():
            obj.copy_(saved)
    else:
        raise CheckpointError(
            f"cannot load the checkpoint's {key!r} into a {type(obj).__name__}",
            hint="restore(into=...) takes objects with load_state_dict(), dicts, lists or tensors",
        )


def init(
    config: Mapping[str, Any] | None = None,
    name: str | None = None,
    project: str | None = None,
    *,
    run_id: str | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    seed: int | None = 0,
    threads: int | None = None,
    resume: bool | str = "auto",
    keep: int | None = None,
    max_local: int | None = None,
    async_checkpoints: bool = True,
) -> Run:
    """Start (or resume) a run. Seeds every RNG with ``seed`` (``None``: leave them) and fixes torch's threads.

    ``resume``: ``"auto"`` carries on from the newest complete checkpoint in the run folder if there is one;
    ``True`` too, but fails when every checkpoint there is damaged; ``False`` refuses a folder that already
    has checkpoints. ``$CHOLINE_RESUME_FROM`` (set by the agent) overrides all of this.
    """
    global _current
    if _current is not None and not _current.finished:
        _current.finish()
    _current = Run(
        config=config,
        name=name,
        project=project,
        run_id=run_id,
        run_dir=run_dir,
        seed=seed,
        threads=threads,
        resume=resume,
        keep=keep,
        max_local=max_local,
        async_checkpoints=async_checkpoints,
    )
    return _current


def current_run() -> Run | None:
    """The run ``choline.init()`` started in this process, if it is not finished."""
    return _current
