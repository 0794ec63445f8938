"""Detectors that read the training curves: NaN/inf, divergence, spikes, plateau, overfitting."""

from __future__ import annotations

import math
from typing import Any

from ..config import DivergenceConfig, NanConfig, OverfitConfig, PlateauConfig, SpikeConfig
from .base import CRITICAL, INFO, WARNING, Detector, Point, Signal, mad, median, push, sig


class NanDetector(Detector):
    """A NaN or inf in the loss, the gradient norm or the validation loss."""

    name = "nan"
    config_cls = NanConfig
    cfg: NanConfig

    def __init__(self, config: NanConfig) -> None:
        super().__init__(config)
        self.streak: dict[str, int] = {}
        self.first_step: dict[str, int] = {}
        self.count = 0
        self.last_finite: dict[str, Any] = {}

    def on_point(self, p: Point) -> Signal | None:
        if p.key not in self.cfg.keys:
            return None
        if p.value is not None:
            self.streak[p.key] = 0
            self.last_finite[p.key] = [p.step, sig(p.value)]
            return None
        self.streak[p.key] = self.streak.get(p.key, 0) + 1
        self.first_step.setdefault(p.key, p.step)
        self.count += 1
        need = self.cfg.grad_norm_consecutive if p.key == "grad_norm" else self.cfg.consecutive
        if self.streak[p.key] < need:
            return None
        raw = p.raw or "not finite"
        last = self.last_finite.get(p.key)
        return self.signal(
            CRITICAL,
            p.step,
            p.t,
            f"{p.key} is {raw} at step {p.step}"
            + (f" (last finite value {last[1]:.4g} at step {last[0]})" if last else "")
            + ": the run will not recover without a fix",
            evidence={
                "key": p.key,
                "value": raw,
                "first_step": self.first_step[p.key],
                "in_a_row": self.streak[p.key],
                "non_finite_points": self.count,
                "last_finite": last,
            },
        )


class DivergenceDetector(Detector):
    """The smoothed loss climbs to ``k`` times its running best after warm-up.

    The best is the lowest smoothed loss so far, or the untrained model's loss (the first point)
    if that is lower: a learning rate that blows the loss up within a few steps never lets the
    smoothed loss set a best of its own.
    """

    name = "divergence"
    config_cls = DivergenceConfig
    cfg: DivergenceConfig

    def __init__(self, config: DivergenceConfig) -> None:
        super().__init__(config)
        self.win: list[float] = []
        self.n = 0
        self.first: list[float] = []
        self.best: float | None = None
        self.best_step = 0

    def on_point(self, p: Point) -> Signal | None:
        if p.key != "loss" or p.value is None:
            return None
        c = self.cfg
        push(self.win, p.value, c.window)
        self.n += 1
        if not self.first:  # the untrained model's loss: the only point before any update
            self.first.append(p.value)
            self.best, self.best_step = p.value, p.step
        if len(self.win) < c.window:
            return None
        cur = median(self.win)
        if self.best is None or cur < self.best:
            self.best, self.best_step = cur, p.step
            return None
        if self.n < c.warmup:
            return None
        floor = c.loss_floor
        above_best = self.best - floor
        if above_best <= 0:
            return None
        start = self.first[0]  # the untrained model's loss (no update before it), for the progress made since
        ratio = (cur - floor) / above_best
        if ratio < c.k or cur - self.best < c.min_regress * max(start - self.best, 0.0):
            return None
        return self.signal(
            CRITICAL,
            p.step,
            p.t,
            f"loss is diverging: {cur:.4g} (median of the last {c.window} points) is {ratio:.3g}x its best "
            f"{self.best:.4g} (step {self.best_step}); the learning rate is the usual cause",
            evidence={
                "loss": sig(cur),
                "best": sig(self.best),
                "best_step": self.best_step,
                "ratio": sig(ratio, 3),
                "k": c.k,
                "start": sig(start),
                "last_value": sig(p.value),
            },
            score=ratio,
        )


class SpikeDetector(Detector):
    """Single points far above the recent median, for the loss and the gradient norm."""

    name = "spike"
    config_cls = SpikeConfig
    cfg: SpikeConfig

    def __init__(self, config: SpikeConfig) -> None:
        super().__init__(config)
        self.hist: dict[str, list[float]] = {}
        self.scale: dict[str, float] = {}

    def on_point(self, p: Point) -> Signal | None:
        if p.key not in self.cfg.keys or p.value is None:
            return None
        c = self.cfg
        h = self.hist.setdefault(p.key, [])
        out: Signal | None = None
        v = p.value
        if len(h) >= c.min_history:
            med = median(h)
            spread = 1.4826 * mad(h, med)
            scale = abs(self.scale.get(p.key, med))
            min_jump = c.grad_norm_min_jump if p.key == "grad_norm" else c.min_jump
            jump = v - med
            z = jump / spread if spread > 0 else (math.inf if jump > 0 else 0.0)
            if z >= c.z and (med <= 0 or v >= c.ratio * med) and jump >= min_jump * scale and jump > 0:
                ratio = v / med if med > 0 else math.inf
                out = self.signal(
                    WARNING,
                    p.step,
                    p.t,
                    f"{p.key} spiked to {v:.4g} at step {p.step}, "
                    + (f"{ratio:.1f}x " if math.isfinite(ratio) else "far above ")
                    + f"its recent median {med:.4g}: a bad batch, or a learning rate at its limit",
                    evidence={
                        "key": p.key,
                        "value": sig(v),
                        "median": sig(med),
                        "robust_z": sig(z, 3) if math.isfinite(z) else "inf",
                        "ratio": sig(ratio, 3) if math.isfinite(ratio) else "inf",
                        "window": len(h),
                        "start_level": sig(scale),
                    },
                    score=ratio if math.isfinite(ratio) else 1e9,
                )
        push(h, v, c.window)
        if p.key not in self.scale and len(h) >= 3:
            self.scale[p.key] = median(h[:3])  # about the untrained model's level
        return out


class PlateauDetector(Detector):
    """No improvement of the smoothed loss beyond ``min_delta`` within the patience window."""

    name = "plateau"
    config_cls = PlateauConfig
    cfg: PlateauConfig

    def __init__(self, config: PlateauConfig) -> None:
        super().__init__(config)
        self.win: list[float] = []
        self.initial: float | None = None
        self.best: float | None = None
        self.ref: float | None = None
        self.ref_step = 0
        self.first_step: int | None = None
        self.first_value: float | None = None

    def on_point(self, p: Point) -> Signal | None:
        if p.key != "loss" or p.value is None:
            return None
        c = self.cfg
        if self.first_step is None:
            self.first_step, self.first_value = p.step, p.value
        push(self.win, p.value, c.window)
        if len(self.win) < c.window:
            return None
        cur = median(self.win)
        f = c.loss_floor
        if self.initial is None or self.ref is None or self.best is None:
            # where it started: the untrained model's loss, unless the first window is lower already
            # (a loss that blew up in its first steps has not made progress by coming back down)
            first = self.first_value if self.first_value is not None else cur
            self.initial = min(first, cur)
            self.ref = self.best = cur
            self.ref_step = p.step
            return None
        self.best = min(self.best, cur)
        if cur - f < (self.ref - f) * (1 - c.min_delta):
            self.ref, self.ref_step = cur, p.step
            return None
        patience = max(c.patience_steps, c.patience_frac * (p.step - self.first_step))
        waited = p.step - self.ref_step
        if waited < patience:
            return None
        span = self.initial - f
        progress = (self.initial - self.best) / span if span > 0 else 0.0
        stuck = progress < c.stuck_progress
        if not stuck and not c.converged:
            return None
        if stuck:
            msg = (
                f"loss is stuck: {cur:.4g} after {p.step - self.first_step} steps, "
                f"{progress:.0%} below where it started ({self.initial:.4g}); check the learning rate, "
                "frozen parameters, and that labels match their inputs"
            )
        else:
            msg = (
                f"loss has not improved by {c.min_delta:.0%} in {waited} steps (best {self.best:.4g}, "
                f"now {cur:.4g}): training has converged, so more steps may be money spent for nothing"
            )
        return self.signal(
            WARNING if stuck else INFO,
            p.step,
            p.t,
            msg,
            evidence={
                "loss": sig(cur),
                "best": sig(self.best),
                "initial": sig(self.initial),
                "since_step": self.ref_step,
                "steps_without_improvement": waited,
                "patience": int(patience),
                "progress": sig(progress, 3),
                "kind": "stuck" if stuck else "converged",
            },
            score=waited / patience,
        )


class OverfitDetector(Detector):
    """Validation loss rising while the training loss keeps falling.

    The validation loss is smoothed over the last ``val_window`` evaluations. Each new best
    validation loss opens a new episode: if the run overfits again after a better checkpoint,
    that is a new finding (it names a different checkpoint to keep).
    """

    name = "overfit"
    config_cls = OverfitConfig
    cfg: OverfitConfig

    def __init__(self, config: OverfitConfig) -> None:
        super().__init__(config)
        self.train: list[float] = []
        self.vals: list[float] = []
        self.evals = 0
        self.best: float | None = None
        self.best_step = 0
        self.train_at_best: float | None = None
        self.above = 0
        self.streak_low: float | None = None
        self.key: str | None = None  # the episode: named after the best it was reported against
        self.key_best: float | None = None

    def on_point(self, p: Point) -> Signal | None:
        c = self.cfg
        if p.value is None:
            return None
        if p.key == "loss":
            push(self.train, p.value, c.window)
            return None
        if p.key != "val_loss":
            return None
        push(self.vals, p.value, c.val_window)
        v = median(self.vals)
        self.evals += 1
        tr = median(self.train) if self.train else None
        if self.best is None or v < self.best:
            self.best, self.best_step, self.train_at_best, self.above = v, p.step, tr, 0
            return None
        falling = False
        if self.best > 0 and v >= self.best * (1 + c.min_rise):
            self.above += 1
            falling = self.streak_low is not None and v < self.streak_low
            self.streak_low = v if self.streak_low is None else min(self.streak_low, v)
        else:
            self.above, self.streak_low = 0, None
        if self.evals < c.min_evals or self.above < c.patience or tr is None or self.train_at_best is None:
            return None
        if falling:
            return None  # above the best but at its lowest since it rose: a bump coming down
        if tr > self.train_at_best * (1 - c.min_train_drop):
            return None
        rise = v / self.best
        if self.key is None or self.key_best is None or self.best < self.key_best * (1 - c.min_rise):
            self.key, self.key_best = f"best-{self.best_step}", self.best
        return self.signal(
            WARNING,
            p.step,
            p.t,
            f"overfitting: validation loss {v:.4g} is {rise - 1:.0%} above its best {self.best:.4g} (step "
            f"{self.best_step}) while training loss fell from {self.train_at_best:.4g} to {tr:.4g}; the checkpoint "
            f"from step {self.best_step} is likely the one to keep",
            evidence={
                "val_loss": sig(v),
                "best_val_loss": sig(self.best),
                "best_step": self.best_step,
                "train_loss_at_best": sig(self.train_at_best),
                "train_loss": sig(tr),
                "evals_above": self.above,
            },
            score=rise,
            episode_key=self.key,
        )
