"""PyTorch Lightning with choline: ``CholineLogger`` (metrics) and ``CholineCheckpoint`` (checkpoint hand-off,
resume, live control).

    run = choline.init(config={...})
    ckpt = CholineCheckpoint(every_n_steps=200)
    trainer = L.Trainer(logger=CholineLogger(), callbacks=[ckpt], max_epochs=10, enable_checkpointing=False)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt.resume_path())   # None on a fresh start

What it covers:

* **logging**: everything ``self.log(...)`` sends to Lightning's loggers becomes a choline metric point at
  Lightning's ``global_step`` (optimizer steps, as choline counts); hyperparameters go into ``run.config``.
* **checkpoints**: every ``every_n_steps`` optimizer steps, at each training epoch's end
  (``every_epoch``) and when ``fit`` ends, Lightning writes its own checkpoint (``trainer.save_checkpoint``)
  and choline carries it byte for byte in a choline checkpoint (async write, manifest, agent upload).
* **resume**: ``resume_path()`` writes the checkpoint the run resumes from (``$CHOLINE_RESUME_FROM`` from
  the agent, or the run folder's newest) back as a ``.ckpt`` file for ``fit(ckpt_path=...)``. Lightning
  restores model, optimizers, schedulers, loops and callbacks; a resume in the middle of an epoch is as
  exact as Lightning's own (not bit-identical for a shuffled map-style DataLoader).
* **live control** after each training batch: ``set lr`` (the first optimizer, its scheduler's base rates
  scaled), ``set epochs`` (``max_epochs``; refused for schedulers sized to the run, and for runs bounded by
  ``max_steps``), ``pause`` (a checkpoint, then exit 75), ``stop`` (a final checkpoint, ``fit`` returns).
  SIGTERM stays Lightning's (its signal connector).

Under DDP only global rank 0 reads the checkpoint file; every rank takes part in the choline checkpoint.
"""

from __future__ import annotations

import logging
import math
from argparse import Namespace
from collections.abc import Mapping
from typing import Any

from choline.train.run import Run, current_run, init

from ._files import pack_files, unpack_files

try:  # the unified package first, the standalone one otherwise
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers.logger import Logger
except ImportError:  # pragma: no cover - exercised where only pytorch_lightning is installed
    import pytorch_lightning as pl  # type: ignore[no-redef]
    from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef,assignment]
    from pytorch_lightning.loggers.logger import Logger  # type: ignore[no-redef,assignment]

log = logging.getLogger("choline.train")

STATE_KEY = "lightning"
CKPT_NAME = "lightning.ckpt"


def _run(run: Run | None) -> Run:
    return run or current_run() or init(seed=None)


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (str, int, float, bool)) or v is None:
            out[key] = v
        else:
            out[key] = str(v)
    return out


class CholineLogger(Logger):
    """Lightning's metrics and hyperparameters into the choline run (``run.log`` at Lightning's global step)."""

    def __init__(self, run: Run | None = None) -> None:
        super().__init__()
        self._choline = _run(run)

    @property
    def name(self) -> str:
        return "choline"

    @property
    def version(self) -> str:
        return self._choline.id

    @property
    def experiment(self) -> Run:
        return self._choline

    @property
    def save_dir(self) -> str:
        return str(self._choline.dir)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(params, Namespace):
            params = vars(params)
        if isinstance(params, Mapping):
            self._choline.config.update(_flatten(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        run = self._choline
        if step is not None and step > run.step:
            run.step = int(step)
            run._moved = True
        run.log(dict(metrics))


class CholineCheckpoint(Callback):
    """Lightning's checkpoints handed to choline (and the agent), a resume path, and live control."""

    def __init__(self, every_n_steps: int | None = None, *, every_epoch: bool = True, run: Run | None = None) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError("every_n_steps must be at least 1")
        self.every_n_steps = every_n_steps
        self.every_epoch = every_epoch
        self._choline = run
        self._trainer: pl.Trainer | None = None
        self._last_saved: int | None = None

    @property
    def run(self) -> Run:
        self._choline = _run(self._choline)
        return self._choline

    @property
    def state_key(self) -> str:
        return "CholineCheckpoint"

    # ---------------------------------------------------------------------------------- resume
    def resume_path(self) -> str | None:
        """The ``.ckpt`` to pass to ``fit(ckpt_path=...)``: the checkpoint this run resumes from, written back
        as Lightning saved it; ``None`` on a fresh start."""
        run = self.run
        tree = run.restore()  # the library's state too: step, epoch, control record, random generators
        if tree is None:
            return None
        if STATE_KEY not in tree:
            raise ValueError(f"the checkpoint at {run.resume_path} was not written by CholineCheckpoint")
        written = unpack_files(tree[STATE_KEY], run.dir / "lightning-resume")
        log.info("resuming Lightning from step %d (%s)", run.step, run.resume_path)
        return str(written[0])

    # ---------------------------------------------------------------------------------- saving
    def _state(self) -> dict[str, Any]:
        trainer = self._trainer
        assert trainer is not None
        run = self.run
        target = run.dir / ".lightning-save" / CKPT_NAME
        target.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(str(target))
        state = pack_files(target) if trainer.is_global_zero else {"files": {}}
        if trainer.is_global_zero:
            target.unlink(missing_ok=True)
        return {STATE_KEY: state}

    def _save(self, trainer: pl.Trainer, reason: str) -> None:
        run = self.run
        run.step = int(trainer.global_step)
        if self._last_saved == run.step and reason != "final":
            return
        run.checkpoint(self._state(), reason=reason)
        self._last_saved = run.step

    # ---------------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        run = self.run
        ctl = run.controls
        ctl.state = self._state
        ctl.on_epochs = self._set_epochs
        ctl.epochs_refusal = self._epochs_refusal
        ctl.planned_units = self._planned_units
        ctl.sync_device = pl_module.device
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            run.total_epochs = run.epochs_set or int(trainer.max_epochs)
            if run.epochs_set is not None:
                trainer.fit_loop.max_epochs = run.epochs_set

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        opts = trainer.optimizers
        sched = trainer.lr_scheduler_configs[0].scheduler if trainer.lr_scheduler_configs else None
        self.run.bind(optimizer=opts[0] if opts else None, scheduler=sched)

    def _set_epochs(self, total: int) -> None:
        if self._trainer is not None:
            self._trainer.fit_loop.max_epochs = total

    def _epochs_refusal(self) -> str | None:
        trainer = self._trainer
        if trainer is None or trainer.max_epochs is None or trainer.max_epochs < 0:
            return "this Lightning run is bounded by max_steps, not epochs"
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return f"this Lightning run also stops at max_steps={trainer.max_steps}"
        return None

    def _planned_units(self) -> float | None:
        trainer = self._trainer
        if trainer is None or not trainer.lr_scheduler_configs:
            return None
        if trainer.lr_scheduler_configs[0].interval == "epoch":
            return float(trainer.max_epochs or 0)
        try:
            steps = float(trainer.estimated_stepping_batches)
        except Exception:
            return None
        return steps if math.isfinite(steps) else None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        run = self.run
        run.step = int(trainer.global_step)
        run.epoch = int(trainer.current_epoch)
        if self.every_n_steps and run.step > 0 and run.step % self.every_n_steps == 0:
            self._save(trainer, "periodic")
        run.controls.poll()
        if run.controls.should_stop:
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_epoch:
            self._save(trainer, "epoch")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, "final")
        self.run.wait()


__all__ = ["CholineCheckpoint", "CholineLogger"]
