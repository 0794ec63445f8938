"""The Hugging Face ``Trainer`` with choline: one callback for logging, checkpoint hand-off, resume and live
control.

    run = choline.init(config={...})
    cb = CholineCallback()
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train(resume_from_checkpoint=cb.resume_from_checkpoint(args.output_dir))  # None when fresh

What it covers:

* **logging**: each ``on_log`` (``loss``, ``learning_rate``, ``grad_norm``, ``eval_*`` ...) becomes choline
  metric points at the Trainer's ``global_step``; the ``TrainingArguments`` go into ``run.config``.
* **checkpoints**: whenever the Trainer saves ``checkpoint-<step>/`` (its ``save_strategy``), choline carries
  that folder byte for byte in a choline checkpoint (async write, manifest, agent upload, retention).
* **resume**: ``resume_from_checkpoint(output_dir)`` writes the checkpoint the run resumes from
  (``$CHOLINE_RESUME_FROM`` from the agent, or the run folder's newest) back as
  ``<output_dir>/checkpoint-<step>/`` and returns its path; the Trainer restores model, optimizer,
  scheduler, RNG and data position as it always does.
* **live control** after each optimizer step: ``set lr`` (optimizer groups and the scheduler's base rates),
  ``pause`` (the Trainer saves a checkpoint at this step, choline writes it, the process exits 75), ``stop``
  (a final save, ``train()`` returns). ``set epochs`` is refused: the Trainer fixes its length and its
  default schedule when ``train()`` starts.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from choline.train.control import Command
from choline.train.run import Run, current_run, init

from ._files import pack_files, unpack_files

log = logging.getLogger("choline.train")

STATE_KEY = "huggingface"
PREFIX = "checkpoint"
SKIP = frozenset({"training_args.bin"})  # a pickle of TrainingArguments: resume does not need it


def _run(run: Run | None) -> Run:
    return run or current_run() or init(seed=None)


class CholineCallback(TrainerCallback):
    """Logging, checkpoint hand-off, resume and live control for ``transformers.Trainer``."""

    def __init__(self, run: Run | None = None) -> None:
        self._choline = run
        self._pause: tuple[Command, int, int] | None = None
        self._stopping = False

    @property
    def run(self) -> Run:
        self._choline = _run(self._choline)
        return self._choline

    # ---------------------------------------------------------------------------------- resume
    def resume_from_checkpoint(self, output_dir: str | Path) -> str | None:
        """The folder to pass to ``trainer.train(resume_from_checkpoint=...)``; ``None`` on a fresh start."""
        run = self.run
        tree = run.restore()
        if tree is None:
            return None
        if STATE_KEY not in tree:
            raise ValueError(f"the checkpoint at {run.resume_path} was not written by CholineCallback")
        dest = Path(output_dir) / f"{PREFIX}-{run.step}"
        unpack_files(tree[STATE_KEY], dest)
        log.info("resuming the Hugging Face Trainer from %s", dest)
        return str(dest)

    # ---------------------------------------------------------------------------------- hooks
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        run = self.run
        try:
            run.config.update({k: v for k, v in args.to_dict().items() if isinstance(v, (str, int, float, bool))})
        except Exception:  # pragma: no cover - TrainingArguments that do not serialise
            pass
        run.bind(optimizer=kwargs.get("optimizer"), scheduler=kwargs.get("lr_scheduler"))
        ctl = run.controls
        ctl.pause_hook = self._on_pause
        ctl.epochs_refusal = lambda: (
            "the Hugging Face Trainer fixes its length (and its learning-rate schedule) when train() starts"
        )
        run.total_epochs = math.ceil(float(args.num_train_epochs))
        run.step = int(state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        run = self.run
        run.step = int(state.global_step)
        run.epoch = int(state.epoch or 0)
        run.controls.poll()
        if run.controls.should_stop and not self._stopping:
            self._stopping = True
            control.should_save = True
            control.should_training_stop = True
        if self._pause is not None:
            control.should_save = True
            control.should_training_stop = True
        return control

    def _on_pause(self, cmd: Command, step: int, tick: int) -> None:
        self._pause = (cmd, step, tick)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        run = self.run
        run.step = max(run.step, int(state.global_step))
        values = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            run.log(values)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        run = self.run
        run.step = int(state.global_step)
        folder = Path(str(args.output_dir)) / f"{PREFIX}-{state.global_step}"
        if not folder.is_dir():
            log.warning("the Trainer saved no %s; nothing handed to choline", folder)
            return
        names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        state_files = pack_files(folder, [n for n in names if n not in SKIP])
        last = state.global_step >= state.max_steps > 0 or control.should_training_stop
        reason = "pause" if self._pause is not None else ("final" if last else "periodic")
        run.checkpoint({STATE_KEY: state_files}, reason=reason)
        if self._pause is not None:
            cmd, step, tick = self._pause
            self._pause = None
            run.wait()
            run.controls.complete_pause(cmd, step, tick)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.run.wait()


__all__ = ["CholineCallback"]
