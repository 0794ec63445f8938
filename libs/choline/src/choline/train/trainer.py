"""``choline.Trainer``: the ordinary supervised loop, resumable at any optimizer step.

It places the model on the GPU when there is one (with autocast, and a grad scaler for float16), runs
under ``torchrun`` with DistributedDataParallel (logging and checkpointing on rank 0), validates after
every epoch, and checkpoints every ``checkpoint_every`` optimizer steps or at each epoch's end. Killed at
any moment and started again, it carries on from its newest complete checkpoint and ends with the same
weights, bit for bit, as a run that was never interrupted (on CPU; on GPUs as far as the kernels are
deterministic).

A batch is ``(inputs..., target)``: the model gets ``model(*inputs)`` and the loss ``loss_fn(output,
target)``. For other shapes, subclass and override ``compute_loss``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from choline_core import faults
from choline_core.errors import UserError

from .control import Cancelled, Paused
from .data import Loader
from .run import Run, current_run, init

log = logging.getLogger("choline.train")

MetricFn = Callable[[torch.Tensor, torch.Tensor], Any]


def accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Share of rows whose arg-max is the target class."""
    return (output.argmax(dim=-1) == target).float().mean()


BUILTIN_METRICS: dict[str, MetricFn] = {"accuracy": accuracy, "acc": accuracy}


class Callback:
    """Hooks for the unusual. Override what you need; set ``trainer.should_stop = True`` to end ``fit`` early.

    A callback with ``state_dict()``/``load_state_dict()`` is checkpointed with the run. ``on_epoch_start``
    runs only when an epoch really starts (not when a run resumes in the middle of one).
    """

    def on_fit_start(self, trainer: Trainer) -> None: ...

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None: ...

    def on_step_end(self, trainer: Trainer, step: int, logs: dict[str, float]) -> None: ...

    def on_validation_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None: ...

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None: ...

    def on_checkpoint(self, trainer: Trainer, step: int, reason: str) -> None: ...

    def on_fit_end(self, trainer: Trainer, logs: dict[str, float]) -> None: ...


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _batch_size(target: Any) -> int:
    if isinstance(target, torch.Tensor) and target.dim() > 0:
        return int(target.shape[0])
    return 1


class Trainer:
    """Fit ``model`` with ``optimizer`` on ``train_loader`` (a ``DataLoader`` or a ``choline.Loader``).

    ``checkpoint_every``: ``"epoch"`` or a number of optimizer steps (a checkpoint due on an epoch's last
    step waits until after validation). A ``"final"`` checkpoint ends every fit. ``scheduler_step``:
    ``"step"`` (after every optimizer step) or ``"epoch"``; a ``ReduceLROnPlateau`` gets the validation loss.
    ``metrics``: names (``"accuracy"``) or ``{name: fn(output, target)}``, averaged over validation samples.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[..., torch.Tensor],
        train_loader: Iterable[Any],
        val_loader: Iterable[Any] | None = None,
        *,
        epochs: int = 1,
        scheduler: Any = None,
        scheduler_step: str = "step",
        metrics: Sequence[str] | Mapping[str, MetricFn] | None = None,
        grad_clip: float | None = None,
        accumulate: int = 1,
        checkpoint_every: str | int = "epoch",
        callbacks: Sequence[Callback] = (),
        run: Run | None = None,
        device: str | torch.device | None = None,
        amp: bool | str = "auto",
        log_every: int = 1,
        auto_batch_size: bool | Mapping[str, Any] = False,
        bundle: Mapping[str, Any] | None = None,
    ) -> None:
        if epochs < 0:
            raise UserError("epochs must not be negative")
        if accumulate < 1:
            raise UserError("accumulate must be at least 1")
        if log_every < 1:
            raise UserError("log_every must be at least 1")
        if scheduler_step not in ("step", "epoch"):
            raise UserError("scheduler_step must be 'step' or 'epoch'")
        if checkpoint_every != "epoch" and not (isinstance(checkpoint_every, int) and checkpoint_every > 0):
            raise UserError(f"checkpoint_every={checkpoint_every!r}: use 'epoch' or a positive number of steps")
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.epochs = int(epochs)
        self.scheduler = scheduler
        self.scheduler_step = scheduler_step
        self.metrics = self._metric_fns(metrics)
        self.grad_clip = grad_clip
        self.accumulate = int(accumulate)
        self.checkpoint_every = checkpoint_every
        self.callbacks = list(callbacks)
        self.log_every = int(log_every)
        self.auto_batch_size = (
            dict(auto_batch_size) if isinstance(auto_batch_size, Mapping) else ({} if auto_batch_size else None)
        )
        self.bundle_options = dict(bundle) if bundle is not None else None
        self.bundle: Any = None  # the Bundle saved at the end of fit
        self.batch_size_result: Any = None
        self.should_stop = False
        self.epoch = 0
        self._epoch_loss_sum = 0.0
        self._epoch_steps = 0
        self._owns_process_group = False
        self._group_left = 0
        self._fits = 0

        self.run = run or current_run() or init(seed=None)
        self._setup_distributed()
        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.amp = (self.device.type == "cuda") if amp == "auto" else bool(amp)
        # bfloat16 needs no grad scaler; float16 only on GPUs without bfloat16
        bf16 = self.device.type != "cuda" or torch.cuda.is_bf16_supported()
        self.amp_dtype = torch.bfloat16 if bf16 else torch.float16
        self.scaler: Any = None
        if self.amp and self.amp_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(self.device.type)
        self.model.to(self.device)
        self.ddp: nn.Module | None = None
        self._prepared = False
        if not isinstance(train_loader, (Loader, torch.utils.data.DataLoader)):
            raise UserError(
                f"train_loader must be a torch DataLoader or a choline.Loader, not a {type(train_loader).__name__}"
            )
        self.loader = Loader.from_dataloader(train_loader, seed=self.run.seed or 0)

    # ---------------------------------------------------------------------------------- setup
    @staticmethod
    def _metric_fns(metrics: Sequence[str] | Mapping[str, MetricFn] | None) -> dict[str, MetricFn]:
        if metrics is None:
            return {}
        if isinstance(metrics, Mapping):
            return dict(metrics)
        out = {}
        for name in metrics:
            if name not in BUILTIN_METRICS:
                raise UserError(f"unknown metric {name!r}", hint=f"built in: {', '.join(sorted(BUILTIN_METRICS))}")
            out[name] = BUILTIN_METRICS[name]
        return out

    def _setup_distributed(self) -> None:
        import torch.distributed as dist

        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world > 1 and dist.is_available() and not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
                backend = "nccl"
            else:
                backend = "gloo"
            dist.init_process_group(backend)
            self._owns_process_group = True
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    @property
    def module(self) -> nn.Module:
        """The model itself (not its DistributedDataParallel wrapper)."""
        return self.model

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"model": self.model, "optimizer": self.optimizer, "trainer": self}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler
        if self.scaler is not None:
            state["scaler"] = self.scaler
        return state

    def state_dict(self) -> dict[str, Any]:
        callbacks = {}
        for i, cb in enumerate(self.callbacks):
            sd = getattr(cb, "state_dict", None)
            if callable(sd):
                callbacks[str(i)] = sd()
        return {"epoch_loss_sum": self._epoch_loss_sum, "epoch_steps": self._epoch_steps, "callbacks": callbacks}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._epoch_loss_sum = float(state["epoch_loss_sum"])
        self._epoch_steps = int(state["epoch_steps"])
        for key, sd in state.get("callbacks", {}).items():
            i = int(key)
            load = getattr(self.callbacks[i], "load_state_dict", None) if i < len(self.callbacks) else None
            if callable(load):
                load(sd)

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    # ---------------------------------------------------------------------------------- one batch
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def compute_loss(self, batch: Any, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``(loss, output, target)`` of one batch. Override for batches that are not ``(inputs..., target)``."""
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise UserError(
                f"a batch must be (inputs..., target), got {type(batch).__name__}",
                hint="override Trainer.compute_loss(batch, model) for other batch shapes",
            )
        *inputs, target = _to(batch, self.device)
        with self._autocast():
            output = model(*inputs)
            loss = self.loss_fn(output, target)
        return loss, output, target

    def _reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            import torch.distributed as dist

            value = value.detach().clone()
            dist.all_reduce(value)
            value /= dist.get_world_size()
        return value

    # ---------------------------------------------------------------------------------- the loop
    def fit(self) -> dict[str, float]:
        """Train for ``epochs`` (from where a restore left off); returns the latest logged values."""
        run = self.run
        run.track(self.loader, name="train", train=True, counts_steps=False)
        state = self._state()
        run.restore(into=state)
        if run.epochs_set is not None:
            if self._fits == 0:
                self.epochs = run.epochs_set  # a control command extended the run before this checkpoint
            run.epochs_set = self.epochs
        self._fits += 1
        self._bind_controls()
        if self.auto_batch_size is not None:
            self._choose_batch_size()
        model: nn.Module = self.model
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
            model = self.ddp
        self._prepared = False
        self._call("on_fit_start")
        try:
            with run.controls.active():
                self._fit_epochs(model)
        except (Paused, Cancelled):
            raise
        except BaseException:
            run.status("failed")
            raise
        finally:
            self.loader.before_batch = None
            if self._owns_process_group:
                import torch.distributed as dist

                run.wait()
                dist.barrier()
                dist.destroy_process_group()
                self._owns_process_group = False
                self.distributed = False
        summary = run.summary
        if self.bundle_options is not None and run.is_main:
            self._save_bundle()
        self._call("on_fit_end", summary)
        return summary

    def _save_bundle(self) -> None:
        """``bundle=dict(path=..., card=..., factory=..., kwargs=..., preprocessing=...)``: written once the fit
        ends (not on a pause), announced to the agent as an artifact."""
        from choline.bundle import save_bundle

        options = dict(self.bundle_options or {})
        path = options.pop("path", None) or self.run.dir / "bundle"
        overwrite = options.pop("overwrite", True)
        self.run.wait()
        self.bundle = save_bundle(self.model, path, run=self.run, overwrite=overwrite, **options)
        self.run.artifact(self.bundle.tarball or self.bundle.path)

    # ---------------------------------------------------------------------------------- batch size
    def _choose_batch_size(self) -> None:
        """The recorded batch size on a resume; otherwise a search (rank 0 searches, every rank uses it)."""
        run = self.run
        found = run.records.get("batch_size")
        size: int | None = int(found["batch_size"]) if isinstance(found, Mapping) else None
        if size is None and run.is_main:
            from .batchsize import find_batch_size

            def step(batch: Any) -> None:
                loss, _, _ = self.compute_loss(batch, self.model)
                loss.backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)

            options = dict(self.auto_batch_size or {})
            options.setdefault("collate_fn", self.loader.collate_fn)
            self.batch_size_result = find_batch_size(
                self.model, self.loader.dataset, optimizer=self.optimizer, step=step, device=self.device,
                run=run, **options,
            )  # fmt: skip
            size = self.batch_size_result.batch_size
        if self.distributed:
            import torch.distributed as dist

            box: list[Any] = [size]
            dist.broadcast_object_list(box, src=0)
            size = int(box[0])
        if size is not None and size != self.loader.batch_size:
            log.info("batch size %d (was %d)", size, self.loader.batch_size)
            self.loader.batch_size = size

    # ---------------------------------------------------------------------------------- live control
    def _bind_controls(self) -> None:
        run = self.run
        ctl = run.controls
        ctl.bind(optimizer=self.optimizer, scheduler=self.scheduler, state=self._state)
        ctl.planned_units = self._planned_units
        ctl.on_epochs = self._on_epochs
        ctl.sync_device = self.device
        self.loader.before_batch = self._before_batch

    def _planned_units(self) -> float | None:
        """The run's planned length in the scheduler's unit (optimizer steps or epochs)."""
        total = self.run.total_epochs or self.epochs
        if self.scheduler_step == "epoch":
            return float(total)
        return float(total * math.ceil(len(self.loader) / self.accumulate))

    def _on_epochs(self, total: int) -> None:
        self.epochs = total

    def _before_batch(self) -> bool:
        """The loader's poll point: before the first batch of each optimizer step. True stops the epoch."""
        if self._group_left != 0:
            return False
        self._poll()
        return self.should_stop

    def _poll(self) -> None:
        self.run.controls.poll()
        if self.run.controls.should_stop:
            self.should_stop = True

    # ---------------------------------------------------------------------------------- epochs
    def _fit_epochs(self, model: nn.Module) -> None:
        run = self.run
        for epoch in run.epochs(self.epochs):
            self.epoch = epoch
            if self.loader.batch_index == 0 and self.loader.epoch == epoch:
                self._epoch_loss_sum, self._epoch_steps = 0.0, 0
                self._call("on_epoch_start", epoch)
            run.status("training")
            step_due = self._train_epoch(model)
            if self.should_stop and not self.loader.exhausted:
                break
            logs = self._end_epoch(model, epoch)
            self._poll()  # the epoch's end: after validation, before its checkpoint (a pause writes its own)
            last = epoch >= (run.total_epochs or self.epochs) - 1 or self.should_stop
            if last:
                self._checkpoint("final")
            elif self.checkpoint_every == "epoch" or step_due:
                self._checkpoint("epoch")
            self._call("on_epoch_end", epoch, logs)
            if self.should_stop:
                break
        if self.should_stop and run.step != self._last_checkpoint_step():
            self._checkpoint("final")

    def _last_checkpoint_step(self) -> int | None:
        return getattr(self, "_ckpt_step", None)

    def _train_epoch(self, model: nn.Module) -> bool:
        """One epoch from the loader's position. True when a step checkpoint fell due on its last step."""
        run, loader, acc = self.run, self.loader, self.accumulate
        n_batches = len(loader)
        model.train()
        self._group_left = group_size = 0
        group_losses: list[torch.Tensor] = []
        step_due = False
        for batch in loader:
            if self._group_left == 0:
                start = loader.batch_index - 1
                self._group_left = min(acc, n_batches - start)
                group_size = self._group_left
                group_losses = []
            self._group_left -= 1
            sync_now = self._group_left == 0
            ctx: Any = contextlib.nullcontext()
            if self.ddp is not None and not sync_now:
                ctx = self.ddp.no_sync()  # type: ignore[operator]
            with ctx:
                loss, _, _ = self.compute_loss(batch, model)
                scaled = loss / group_size
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            group_losses.append(loss.detach())
            if not sync_now:
                continue
            self._optimizer_step()
            if not self._prepared:
                # after the first step the optimizer has its state (Adam's moments): allocate the checkpoint
                # buffers now, in the background, so no checkpoint pays for page faults on the training thread
                run.prepare_checkpoint(self._state())
                self._prepared = True
            step = run.advance()
            step_loss = self._reduce_mean(torch.stack(group_losses).float().mean())
            value = float(step_loss.item())
            self._epoch_loss_sum += value
            self._epoch_steps += 1
            logs: dict[str, float] = {}
            if step % self.log_every == 0:
                logs = {"train/loss": value, "lr": float(self.optimizer.param_groups[0]["lr"])}
                run.log(logs)
            self._call("on_step_end", step, logs)
            if isinstance(self.checkpoint_every, int) and step % self.checkpoint_every == 0:
                if loader.exhausted:
                    step_due = True  # taken after validation, with the epoch's metrics
                else:
                    self._checkpoint("periodic")
            faults.barrier("train.step", at=step)
            if self.should_stop and not loader.exhausted:
                break
        return step_due

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            if self.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None and self.scheduler_step == "step":
            self.scheduler.step()

    def _end_epoch(self, model: nn.Module, epoch: int) -> dict[str, float]:
        logs: dict[str, float] = {}
        if self._epoch_steps:
            logs["train/epoch_loss"] = self._epoch_loss_sum / self._epoch_steps
        if self.val_loader is not None:
            self.run.status("validating")
            val = self.validate(model)
            logs.update(val)
            self._call("on_validation_end", epoch, val)
        logs["epoch"] = float(epoch)
        self.run.log(logs)
        if self.scheduler is not None and self.scheduler_step == "epoch":
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                key = "val/loss" if "val/loss" in logs else "train/epoch_loss"
                self.scheduler.step(logs.get(key, math.nan))
            else:
                self.scheduler.step()
        return logs

    @torch.no_grad()
    def validate(self, model: nn.Module | None = None) -> dict[str, float]:
        """Loss and ``metrics`` over ``val_loader``, averaged per sample (over all ranks)."""
        if self.val_loader is None:
            return {}
        model = model or self.model
        was_training = model.training
        model.eval()
        names = ["loss", *self.metrics]
        sums = torch.zeros(len(names) + 1, dtype=torch.float64)
        for batch in self.val_loader:
            loss, output, target = self.compute_loss(batch, model)
            n = _batch_size(target)
            sums[0] += float(loss) * n
            for i, fn in enumerate(self.metrics.values(), start=1):
                sums[i] += float(fn(output, target)) * n
            sums[-1] += n
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(sums)
        model.train(was_training)
        count = float(sums[-1]) or 1.0
        return {f"val/{name}": float(sums[i]) / count for i, name in enumerate(names)}

    def _checkpoint(self, reason: str) -> None:
        self.run.checkpoint(self._state(), reason=reason)
        self._ckpt_step = self.run.step
        self._call("on_checkpoint", self.run.step, reason)
