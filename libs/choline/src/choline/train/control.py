"""Live control: pause, stop, cancel, change the learning rate, extend the epochs, while a run trains.

Commands come from three places, all read by global rank 0 at **poll points** between optimizer steps:

* the worker-agent (``control`` messages it relays from the control plane: ``choline pause|stop|set RUN``);
* the run folder's ``control/`` directory (one JSON file per command): the local channel for laptop runs,
  written by ``choline.train.control.send()`` or ``python -m choline.train.control RUN_DIR pause``;
* the script itself (``run.control("set", lr=1e-4)``) and SIGTERM (a pause).

Where the loop polls: the Trainer before it fetches the first batch of each optimizer step and once more at
each epoch's end (after validation, before the epoch's checkpoint); a loop of your own over ``run.loader``
before every batch it fetches; anything else where it calls ``run.poll()``.

**Exact replay.** Every poll point has a position ``(step, tick)``: the global step and how many polls that
step has seen. A command takes effect at the poll that reads it, and its record (``controls.jsonl``, the
``control_ack`` to the agent, and every later checkpoint) carries that position. A checkpoint saves the ids
of the commands already in its state and the tick it was taken at. A run that resumes from a checkpoint
older than a change applies the change again when it reaches the same position, so it ends exactly where a
run that got the change live would. Only state-changing commands (``set``) are replayed; the replay sources
are the run folder's ``controls.jsonl`` and the file named by ``$CHOLINE_CONTROL_LOG`` (the control plane's
record, handed to a new attempt on another machine).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from choline_core import agent_protocol as proto
from choline_core.errors import UserError

from .channel import ACTIONS, CONTROL_DIR, CONTROL_LOG, ENV_CONTROL_LOG, read_records, send

__all__ = [
    "ACTIONS",
    "CONTROL_DIR",
    "CONTROL_LOG",
    "Cancelled",
    "Command",
    "Controls",
    "Paused",
    "Refused",
    "length_bound",
    "read_records",
    "send",
    "set_lr",
]

if TYPE_CHECKING:  # pragma: no cover
    from .run import Run

log = logging.getLogger("choline.train")

ENV_SIGTERM_GRACE = "CHOLINE_SIGTERM_GRACE"
REPLAYED = frozenset({"set"})
EXIT_CANCELLED = 1


class Paused(SystemExit):
    """Raised once the pause checkpoint is written: the process exits with ``EXIT_PAUSED`` (75)."""

    def __init__(self, step: int) -> None:
        super().__init__(proto.EXIT_PAUSED)
        self.step = step


class Cancelled(SystemExit):
    """Raised by a ``cancel`` command: the process ends now, without a checkpoint (exit status 1)."""

    def __init__(self, step: int) -> None:
        super().__init__(EXIT_CANCELLED)
        self.step = step


class Refused(Exception):
    """A command cannot be applied; the message says why (it goes back to the user in the ack)."""


@dataclass
class Command:
    id: str
    action: str
    params: dict[str, Any] = field(default_factory=dict)
    source: str = "agent"  # agent | local | script | signal | replay
    step: int | None = None  # replays: where it took effect originally
    tick: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "action": self.action, "params": self.params, "source": self.source}


# ===================================================================================== learning rate
def _walk(scheduler: Any) -> Iterator[Any]:
    """A scheduler and the ones it chains (``SequentialLR``, ``ChainedScheduler``)."""
    if scheduler is None:
        return
    yield scheduler
    for child in getattr(scheduler, "_schedulers", None) or []:
        yield from _walk(child)


def _group_label(groups: list[dict[str, Any]], i: int) -> str:
    name = groups[i].get("name")
    return str(name) if isinstance(name, str) and name else str(i)


def resolve_groups(optimizer: torch.optim.Optimizer, which: str | None) -> list[int]:
    """Indices of the param groups ``which`` names: ``None`` all; a group's ``name``; or its index."""
    groups = optimizer.param_groups
    if which is None:
        return list(range(len(groups)))
    named = [i for i, g in enumerate(groups) if g.get("name") == which]
    if named:
        return named
    if which.isdigit() and int(which) < len(groups):
        return [int(which)]
    labels = ", ".join(_group_label(groups, i) for i in range(len(groups)))
    raise Refused(f"no parameter group named {which!r} (groups: {labels})")


def parse_lr(value: Any) -> tuple[str, float]:
    """``3e-4`` / ``"3e-4"`` / ``"=3e-4"`` set it; ``"*0.5"`` / ``"x0.5"`` scale it."""
    kind, raw = "set", value
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in ("*", "x"):
            kind, raw = "scale", text[1:]
        elif text[:1] == "=":
            raw = text[1:]
    if isinstance(raw, bool):
        raise Refused(f"lr={value!r} is not a number")
    try:
        number = float(raw)
    except (TypeError, ValueError):
        raise Refused(f"lr={value!r} is not a number (use 3e-4, or *0.5 to scale)") from None
    if not math.isfinite(number) or number <= 0:
        raise Refused(f"lr={value!r} must be a positive finite number")
    return kind, number


def _set_value(group: dict[str, Any], key: str, value: float) -> None:
    current = group.get(key)
    if isinstance(current, torch.Tensor):
        current.fill_(value)
    else:
        group[key] = value


def set_lr(optimizer: torch.optim.Optimizer, scheduler: Any, value: Any, which: str | None = None) -> dict[str, float]:
    """Set (or scale) the learning rate of the groups ``which`` names, and scale the scheduler's base rates
    by the same factor so that its next step continues the schedule from the new rate instead of
    overwriting it. Returns ``{group: new lr}``.

    Scaled with each group: ``lr``, ``initial_lr``, ``max_lr`` and ``min_lr`` (OneCycleLR), every scheduler's
    ``base_lrs`` / ``_last_lr`` and CyclicLR's ``max_lrs``, through ``SequentialLR`` and ``ChainedScheduler``.
    A ``ReduceLROnPlateau`` keeps its ``min_lrs``. A group whose rate is 0 now (a warmup at its start) is
    refused: no factor maps 0 to the new rate.
    """
    kind, number = parse_lr(value)
    idx = resolve_groups(optimizer, which)
    groups = optimizer.param_groups
    plan: list[tuple[int, float, float]] = []
    for i in idx:
        old = float(groups[i]["lr"])
        if old <= 0 or not math.isfinite(old):
            raise Refused(f"the learning rate of group {_group_label(groups, i)} is {old} now; it cannot be scaled")
        new = old * number if kind == "scale" else number
        plan.append((i, new, new / old))
    effect: dict[str, float] = {}
    for i, new, factor in plan:
        g = groups[i]
        _set_value(g, "lr", new)
        for key in ("initial_lr", "max_lr", "min_lr"):
            if key in g and isinstance(g[key], (int, float, torch.Tensor)):
                _set_value(g, key, float(g[key]) * factor)
        for s in _walk(scheduler):
            for attr in ("base_lrs", "max_lrs"):
                rates = getattr(s, attr, None)
                if isinstance(rates, list) and i < len(rates) and isinstance(rates[i], (int, float)):
                    rates[i] = float(rates[i]) * factor
            last = getattr(s, "_last_lr", None)
            if isinstance(last, list) and i < len(last):
                last[i] = new
        effect[_group_label(groups, i)] = new
    return effect


def length_bound(scheduler: Any, planned: float | None) -> str | None:
    """Why ``scheduler`` cannot follow a change of the run's length, or ``None`` when it can.

    OneCycleLR always is (it fails past ``total_steps``). CosineAnnealingLR (``T_max``), PolynomialLR and
    LinearLR (``total_iters``) are when their horizon reaches the end of the planned run (90 % of it or
    more, in the scheduler's own unit): they were sized to it. Step, multi-step, exponential, lambda,
    cyclic, warm-restart and plateau schedulers follow any length.
    """
    for s in _walk(scheduler):
        name = type(s).__name__
        if name == "OneCycleLR":
            return (
                f"OneCycleLR's schedule is fixed by its total_steps ({getattr(s, 'total_steps', '?')}); "
                "restart with a longer schedule, or use a scheduler that does not depend on the run's length"
            )
        horizon = getattr(s, "T_max", None) if name == "CosineAnnealingLR" else None
        if name in ("PolynomialLR", "LinearLR"):
            horizon = getattr(s, "total_iters", None)
        if horizon is not None and planned and float(horizon) >= 0.9 * planned:
            what = "T_max" if name == "CosineAnnealingLR" else "total_iters"
            return (
                f"{name}'s shape is fixed by its {what} ({horizon}), the length of the run as planned; "
                "restart with a schedule for the new length"
            )
    return None


def parse_epochs(value: Any, current_total: int) -> int:
    """``20`` / ``"=20"`` set the total; ``"+5"`` / ``"-2"`` change it."""
    if isinstance(value, bool):
        raise Refused(f"epochs={value!r} is not a number")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if float(value) != int(value):
            raise Refused(f"epochs={value!r} is not a whole number")
        return int(value)
    text = str(value).strip()
    try:
        if text[:1] in "+-" and text[1:].strip().isdigit():
            return current_total + int(text.replace(" ", ""))
        if text[:1] == "=":
            text = text[1:]
        return int(text)
    except (ValueError, IndexError):
        raise Refused(f"epochs={value!r}: use +N, -N, =N or N") from None


# ===================================================================================== the controller
class Controls:
    """One run's live control: sources, the targets commands act on, the record, and replays.

    Made by the run (``run.controls``). ``bind`` says what ``set lr``, ``set epochs`` and ``pause`` act on;
    the Trainer and the integrations bind themselves.
    """

    def __init__(self, run: Run) -> None:
        self.run = run
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.state: Callable[[], Mapping[str, Any]] | None = None
        self.planned_units: Callable[[], float | None] | None = None  # the run's length in the scheduler's unit
        self.on_epochs: Callable[[int], None] | None = None
        self.epochs_refusal: Callable[[], str | None] | None = None
        self.handlers: dict[str, Callable[[Any], Any]] = {}
        # a framework that checkpoints by itself takes the pause over: it gets (command, step, tick), saves
        # when it can, then calls complete_pause(); None: pause() checkpoints ``state`` here and now
        self.pause_hook: Callable[[Command, int, int], None] | None = None
        self.should_stop = False
        self.sync_device: torch.device | None = None
        self._queue: deque[Command] = deque()
        self._applied: set[str] = set()  # ids of commands the current state includes
        self._history: list[dict[str, Any]] = []  # records of the applied commands (in the checkpoint)
        self._replays: list[dict[str, Any]] = []
        self._replays_loaded = False
        self._step = -1
        self._tick = 0
        self._dir = run.dir / CONTROL_DIR
        self._dir_seen: int | None = None
        self._lock = threading.Lock()
        self._signal_installed = False
        self._previous_handler: Any = None
        self._sigterm_at: float | None = None
        self._watchdog: threading.Timer | None = None
        self._deferred_pause: Command | None = None
        self.polls = 0

    # ---------------------------------------------------------------------------------- binding
    def bind(
        self,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        state: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        if optimizer is not None:
            self.optimizer = optimizer
        if scheduler is not None:
            self.scheduler = scheduler
        if state is not None:
            self.state = state if callable(state) else (lambda s=state: s)  # type: ignore[misc]

    def on_set(self, key: str, fn: Callable[[Any], Any]) -> None:
        """Handle ``set KEY=VALUE`` with ``fn(value)`` (its return value is recorded). Replayed on resume like
        the built-in keys, so ``fn`` must depend only on the value and the training state."""
        if key == "epochs" or key == "lr" or key.startswith("lr."):
            raise UserError(f"{key!r} is built in")
        self.handlers[key] = fn

    def submit(self, action: str, params: Mapping[str, Any] | None = None, *, source: str = "script") -> str:
        """Queue a command from this process; it is applied at the next poll point."""
        cid = f"{source}-{secrets.token_hex(6)}"
        with self._lock:
            self._queue.append(Command(cid, action, dict(params or {}), source=source))
        return cid

    # ---------------------------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {"applied": sorted(self._applied), "history": list(self._history), "tick": self._tick_now()}

    def load_state_dict(self, state: Mapping[str, Any] | None, step: int) -> None:
        state = state or {}
        self._applied = set(state.get("applied") or [])
        self._history = list(state.get("history") or [])
        self._step = step
        self._tick = int(state.get("tick") or 0)
        self._load_replays(step)

    def _tick_now(self) -> int:
        return self._tick if self._step == self.run.step else 0

    # ---------------------------------------------------------------------------------- replays
    def _load_replays(self, from_step: int) -> None:
        """Commands recorded earlier (this folder's log, ``$CHOLINE_CONTROL_LOG``) that the state lacks."""
        self._replays_loaded = True
        if not self.run.is_main:
            return
        records: dict[str, dict[str, Any]] = {}
        sources = [self.run.dir / CONTROL_LOG]
        if os.environ.get(ENV_CONTROL_LOG):
            sources.append(Path(os.environ[ENV_CONTROL_LOG]))
        for src in sources:
            for rec in read_records(src):
                ok = rec.get("ok") and rec.get("action") in REPLAYED
                if ok and isinstance(rec.get("id"), str) and isinstance(rec.get("step"), int):
                    records.setdefault(rec["id"], rec)
        pending = []
        for rec in records.values():
            if rec["id"] in self._applied:
                continue
            pending.append(rec)
        pending.sort(key=lambda r: (int(r["step"]), int(r.get("tick") or 0), float(r.get("ts") or 0)))
        self._replays = pending
        if pending:
            log.info(
                "%d control command(s) to replay: %s",
                len(pending),
                ", ".join(f"{r['action']} {r.get('params')} at step {r['step']}" for r in pending),
            )

    def _due_replays(self, step: int, tick: int) -> list[Command]:
        due = []
        keep = []
        for rec in self._replays:
            pos = (int(rec["step"]), int(rec.get("tick") or 0))
            if pos == (step, tick):
                due.append(rec)
            elif pos < (step, tick):
                log.warning(
                    "control %s (%s %s) took effect at step %s originally; this run is past it: applying it now",
                    rec["id"],
                    rec["action"],
                    rec.get("params"),
                    rec["step"],
                )
                due.append(rec)
            else:
                keep.append(rec)
        self._replays = keep
        return [
            Command(
                r["id"], r["action"], dict(r.get("params") or {}), source="replay", step=r["step"], tick=r.get("tick")
            )
            for r in due
        ]

    # ---------------------------------------------------------------------------------- collecting
    def _collect(self) -> list[Command]:
        """Live commands waiting now (rank 0): the agent's, the control folder's, this process's."""
        out: list[Command] = []
        link = self.run._link
        if link is not None:
            while link.controls:
                c = link.controls.popleft()
                out.append(Command(c.id, c.action, dict(c.params), source="agent"))
        out.extend(self._read_dir())
        with self._lock:
            while self._queue:
                out.append(self._queue.popleft())
        return out

    def _read_dir(self) -> list[Command]:
        try:
            mtime = os.stat(self._dir).st_mtime_ns
        except OSError:
            return []
        if mtime == self._dir_seen:
            return []
        self._dir_seen = mtime
        out = []
        for name in sorted(os.listdir(self._dir)):
            if name.startswith(".") or not name.endswith(".json"):
                continue
            path = self._dir / name
            try:
                data = json.loads(path.read_text())
                cmd = Command(
                    str(data.get("id") or f"local-{secrets.token_hex(6)}"),
                    str(data["action"]),
                    dict(data.get("params") or {}),
                    source="local",
                )
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning("ignoring the unreadable control file %s: %s", path, exc)
                cmd = None
            with contextlib.suppress(OSError):
                path.unlink()
            if cmd is not None:
                out.append(cmd)
        return out

    def _sync(self, cmds: list[Command]) -> list[Command]:
        """Under ``torch.distributed``: rank 0's list, on every rank (all ranks poll at the same points)."""
        import torch.distributed as dist

        if self.run.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return cmds
        device = self.sync_device or torch.device("cpu")
        if dist.get_backend() == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        flag = torch.tensor([len(cmds) if self.run.is_main else 0], dtype=torch.int64, device=device)
        dist.broadcast(flag, src=0)
        if int(flag.item()) == 0:
            return []
        box: list[Any] = [[c.__dict__ for c in cmds] if self.run.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return [Command(**d) for d in box[0]]

    # ---------------------------------------------------------------------------------- polling
    def poll(self) -> list[dict[str, Any]]:
        """Apply what is waiting at this point. Returns the records of this poll.

        ``set`` applies at once. ``stop`` sets ``should_stop``. ``pause`` writes a checkpoint (or reuses the
        one taken at this very step), acknowledges, finishes the run and raises ``Paused``. ``cancel`` raises
        ``Cancelled``. Pause and cancel act after the other commands of the same poll.
        """
        run = self.run
        step = run.step
        if step != self._step:
            self._step, self._tick = step, 0
        tick = self._tick
        self._tick += 1
        self.polls += 1
        if not self._replays_loaded:
            self._load_replays(step)
        cmds: list[Command] = []
        if run.is_main:
            if self._deferred_pause is not None:
                cmds.append(self._deferred_pause)
                self._deferred_pause = None
            cmds.extend(self._due_replays(step, tick))
            cmds.extend(self._collect())
        cmds = self._sync(cmds)
        if not cmds:
            return []
        records = []
        pause: Command | None = None
        cancel: Command | None = None
        changed = False
        for cmd in cmds:
            if cmd.action == "pause":
                pause = pause or cmd
                continue
            if cmd.action == "cancel":
                cancel = cancel or cmd
                continue
            rec = self._apply(cmd, step, tick)
            records.append(rec)
            changed = changed or (rec["ok"] and cmd.action in REPLAYED)
        if cancel is not None:
            self._record(cancel, step, tick, True, None, {})
            self._finish_process("cancelled")
            raise Cancelled(step)
        if pause is not None:
            if self.pause_hook is not None:
                self.pause_hook(pause, step, tick)
            else:
                records.append(self.pause(pause, step, tick, changed=changed))
        return records

    def _apply(self, cmd: Command, step: int, tick: int) -> dict[str, Any]:
        try:
            if cmd.action == "stop":
                self.should_stop = True
                effect: dict[str, Any] = {"stop": True}
                self.run._log_mark("control/stop", 1.0, replay=False)
            elif cmd.action == "set":
                effect = self._apply_set(cmd.params, replay=cmd.source == "replay")
            elif cmd.action == "resume":
                raise Refused("nothing to resume: the run is running")
            else:
                raise Refused(f"unknown action {cmd.action!r} (use {', '.join(ACTIONS)})")
        except Refused as exc:
            return self._record(cmd, step, tick, False, str(exc), {})
        return self._record(cmd, step, tick, True, None, effect)

    def _apply_set(self, params: Mapping[str, Any], *, replay: bool) -> dict[str, Any]:
        if not params:
            raise Refused("set needs KEY=VALUE pairs (lr=3e-4, epochs=+5)")
        unknown = [k for k in params if not (k in ("lr", "epochs") or k.startswith("lr.") or k in self.handlers)]
        if unknown:
            known = ["lr", "lr.<group>", "epochs", *sorted(self.handlers)]
            raise Refused(f"unknown setting(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
        # check everything first: a command applies whole or not at all
        total: int | None = None
        if "epochs" in params:
            total = self._check_epochs(params["epochs"])
        lr_keys = sorted((k for k in params if k == "lr" or k.startswith("lr.")), key=lambda k: (k != "lr", k))
        if lr_keys:
            if self.optimizer is None:
                raise Refused("no optimizer to set the learning rate of (the script did not call run.bind)")
            for k in lr_keys:
                parse_lr(params[k])
                resolve_groups(self.optimizer, None if k == "lr" else k[3:])
        effect: dict[str, Any] = {}
        for k in lr_keys:
            assert self.optimizer is not None
            new = set_lr(self.optimizer, self.scheduler, params[k], None if k == "lr" else k[3:])
            effect.setdefault("lr", {}).update(new)
            self.run._log_mark("control/lr", next(iter(new.values())), replay=replay)
        if total is not None:
            self._set_epochs(total)
            effect["epochs"] = total
            self.run._log_mark("control/epochs", float(total), replay=replay)
        for k, v in params.items():
            if k in self.handlers:
                result = self.handlers[k](v)
                effect[k] = result if _jsonable(result) else str(result)
        return effect

    def _check_epochs(self, value: Any) -> int:
        run = self.run
        current = run.total_epochs
        if current is None:
            raise Refused("this loop does not count epochs (use run.epochs(n) or the Trainer)")
        total = parse_epochs(value, current)
        floor = run.epoch + 1
        if total < floor:
            raise Refused(f"the run is in epoch {run.epoch} (counting from 0): epochs must be at least {floor}")
        if total != current:
            reason = self.epochs_refusal() if self.epochs_refusal is not None else None
            if reason is None:
                planned = self.planned_units() if self.planned_units is not None else None
                reason = length_bound(self.scheduler, planned)
            if reason:
                raise Refused(f"epochs cannot change: {reason}")
        return total

    def _set_epochs(self, total: int) -> None:
        self.run.total_epochs = total
        self.run.epochs_set = total
        if self.on_epochs is not None:
            self.on_epochs(total)

    def _record(
        self, cmd: Command, step: int, tick: int, ok: bool, message: str | None, effect: dict[str, Any]
    ) -> dict[str, Any]:
        run = self.run
        rec = {
            "id": cmd.id,
            "action": cmd.action,
            "params": cmd.params,
            "ok": ok,
            "step": step,
            "tick": tick,
            "epoch": run.epoch,
            "attempt": run.attempt,
            "source": cmd.source,
            "effect": effect,
            "message": message,
            "ts": time.time(),
            "replay": cmd.source == "replay",
        }
        if ok:
            self._applied.add(cmd.id)
            if cmd.action in REPLAYED:
                self._history.append({k: rec[k] for k in ("id", "action", "params", "step", "tick", "effect")})
        if run.is_main:
            run._append_control_record(rec)
            verdict = "applied" if ok else "refused"
            what = f"{cmd.action} {json.dumps(cmd.params, sort_keys=True)}" if cmd.params else cmd.action
            origin = " (replayed)" if cmd.source == "replay" else ""
            log.log(
                logging.INFO if ok else logging.WARNING,
                "control %s %s at step %d%s%s",
                what,
                verdict,
                step,
                origin,
                f": {message}" if message else "",
            )
            run._send_ack(rec)
        return rec

    # ---------------------------------------------------------------------------------- pause
    def refuse(self, cmd: Command, step: int, tick: int, message: str) -> dict[str, Any]:
        return self._record(cmd, step, tick, False, message, {})

    def pause(self, cmd: Command, step: int, tick: int, *, changed: bool = False) -> dict[str, Any]:
        """Checkpoint (or reuse the checkpoint taken at this very step), acknowledge, finish, raise ``Paused``."""
        run = self.run
        if self.state is None:
            return self._record(
                cmd, step, tick, False, "nothing to checkpoint: the script did not call run.bind(state=...)", {}
            )
        reuse = run._checkpointed_at == step and run.step == step
        if reuse and changed:
            # a change applied in this poll is not in that checkpoint: pause at the next poll, with a new one
            self._deferred_pause = cmd
            return {"id": cmd.id, "action": "pause", "ok": True, "deferred": True, "step": step}
        self._cancel_watchdog()
        if reuse:
            run.wait()
            reuse = run._checkpoint_ok(step)
        if not reuse:
            run.checkpoint(self.state(), reason="pause", wait=True)
            if not run._checkpoint_ok(step):
                return self._record(cmd, step, tick, False, "the pause checkpoint could not be written", {})
        self.complete_pause(cmd, step, tick)

    def complete_pause(self, cmd: Command, step: int, tick: int) -> NoReturn:
        """The pause checkpoint of ``step`` is complete: acknowledge, finish the run, raise ``Paused``."""
        self.run._log_mark("control/pause", 1.0, replay=False)
        self._record(cmd, step, tick, True, None, {"checkpoint": self.run.step})
        self._finish_process("paused")
        raise Paused(self.run.step)

    def _finish_process(self, phase: str) -> None:
        self.uninstall_signal()
        self.run.finish(phase)

    # ---------------------------------------------------------------------------------- SIGTERM
    def install_signal(self) -> None:
        """SIGTERM becomes a pause at the next poll point. Only when the handler is the default one (a
        script's own handler is left alone), only in the main thread. If no poll point comes within
        ``$CHOLINE_SIGTERM_GRACE`` seconds (default 20: the loop is busy elsewhere), or a second SIGTERM
        arrives, the process terminates as it would have without choline."""
        if self._signal_installed or threading.current_thread() is not threading.main_thread():
            return
        try:
            current = signal.getsignal(signal.SIGTERM)
        except (ValueError, OSError):  # pragma: no cover
            return
        if current not in (signal.SIG_DFL, None):
            return
        try:
            signal.signal(signal.SIGTERM, self._on_sigterm)
        except (ValueError, OSError):  # pragma: no cover
            return
        self._previous_handler = current
        self._signal_installed = True

    def uninstall_signal(self) -> None:
        self._cancel_watchdog()
        if not self._signal_installed:
            return
        self._signal_installed = False
        if threading.current_thread() is threading.main_thread():
            with contextlib.suppress(ValueError, OSError):
                if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
                    signal.signal(signal.SIGTERM, self._previous_handler or signal.SIG_DFL)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self._sigterm_at is not None:
            self._terminate()
            return
        self._sigterm_at = time.monotonic()
        with self._lock:
            self._queue.append(Command(f"sigterm-{os.getpid()}-{int(time.time())}", "pause", {}, source="signal"))
        grace = float(os.environ.get(ENV_SIGTERM_GRACE) or 20.0)
        self._watchdog = threading.Timer(grace, self._terminate)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _cancel_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _terminate(self) -> None:
        log.warning("SIGTERM: no poll point came in time; terminating without a pause checkpoint")
        with contextlib.suppress(ValueError, OSError):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGTERM)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """SIGTERM handled as a pause while the block runs (a training loop that polls)."""
        self.install_signal()
        try:
            yield
        finally:
            self.uninstall_signal()


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False
