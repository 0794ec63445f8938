"""What the detectors look for, and how hard: one pydantic model with documented defaults.

``MonitorConfig()`` is the installation default (tuned on the tuning half of the evaluation
corpus, see docs/monitor.md). A run can override any field::

    cfg = MonitorConfig().with_overrides({"divergence": {"k": 6}, "stall": {"min_seconds": 600}})
    cfg = MonitorConfig().with_overrides(parse_overrides(["divergence.k=6", "gpu_util.enabled=false"]))

Unknown detectors or fields are refused with a clear message (``BadSpec``), so a typo never
silently leaves the default in place.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from choline_core.errors import BadSpec

SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DetectorConfig(_Strict):
    """What every detector shares: on/off and how findings are grouped into one problem.

    A detector's signals belong to one episode (one finding) while they keep coming with gaps
    shorter than ``cooldown_steps`` steps and ``cooldown_s`` seconds; a quiet gap longer than
    either starts a new episode. Inside an episode a signal breaks through as a new finding when
    its severity is higher, or when ``breakthrough`` is set and its score (the detector's "how
    bad" number) is at least ``breakthrough`` times the score last reported; at most
    ``breakthrough_limit`` times per episode (a value that keeps doubling is one story).
    """

    enabled: bool = True
    cooldown_steps: int = Field(500, ge=0)
    cooldown_s: float = Field(1800.0, ge=0)
    breakthrough: float | None = Field(4.0, gt=1.0)
    breakthrough_limit: int = Field(2, ge=0)


class NanConfig(DetectorConfig):
    """A non-finite value (NaN, inf) in one of ``keys``; ``consecutive`` of them in a row per key.

    Mixed-precision training skips the odd step with an inf gradient norm on purpose (the grad
    scaler backs off), so the gradient norm needs ``grad_norm_consecutive`` in a row.
    """

    keys: list[str] = ["loss", "grad_norm", "val_loss"]
    consecutive: int = Field(1, ge=1)
    grad_norm_consecutive: int = Field(3, ge=1)
    breakthrough: float | None = None


class DivergenceConfig(DetectorConfig):
    """The smoothed loss (median of the last ``window`` points) rises above ``k`` times its best.

    The best is the lowest smoothed loss so far, or the untrained model's loss (the first point)
    when that is lower. Only after ``warmup`` loss points, and only when the
    rise also gives back at least ``min_regress`` of the progress made from the start to the best
    (so a loss that is already tiny and merely noisy is not called divergent). ``loss_floor`` is
    the loss's lower bound (0 for cross-entropy and MSE); ratios are taken above it.
    """

    k: float = Field(4.0, gt=1.0)
    window: int = Field(20, ge=1)
    warmup: int = Field(30, ge=1)
    min_regress: float = Field(0.25, ge=0.0)
    loss_floor: float = 0.0
    breakthrough: float | None = None  # a diverged loss diverging further is not news


class SpikeConfig(DetectorConfig):
    """One point far out of line with the recent ones (robust: median and MAD of ``window`` points).

    A spike needs all of: a robust z-score of at least ``z``; at least ``ratio`` times the recent
    median; and a jump above the median of at least ``min_jump`` times the key's level at the
    start of the run (the median of its first 3 points, about the untrained model's), so that the
    heavy-tailed minibatch noise of a nearly trained model is not called a spike. Gradient norms
    are noisier than losses: theirs is ``grad_norm_min_jump``.
    """

    keys: list[str] = ["loss", "grad_norm"]
    window: int = Field(50, ge=5)
    min_history: int = Field(20, ge=5)
    z: float = Field(10.0, gt=0)
    ratio: float = Field(3.0, ge=1.0)
    min_jump: float = Field(1.5, ge=0.0)
    grad_norm_min_jump: float = Field(15.0, ge=0.0)
    cooldown_steps: int = Field(200, ge=0)


class PlateauConfig(DetectorConfig):
    """The smoothed training loss has not improved by ``min_delta`` (relative) for a patience window.

    Patience is ``max(patience_steps, patience_frac * steps so far)`` steps. A run that never
    improved on its start by ``stuck_progress`` is stuck (``warning``). One that improved and then
    stopped has converged: that is reported (as ``info``: it may be time to stop paying for it)
    only when ``converged`` is on, since it is news, not a problem.
    """

    converged: bool = False

    window: int = Field(20, ge=1)
    min_delta: float = Field(0.01, ge=0.0)
    patience_steps: int = Field(150, ge=1)
    patience_frac: float = Field(0.25, ge=0.0)
    stuck_progress: float = Field(0.1, ge=0.0)
    loss_floor: float = 0.0
    breakthrough: float | None = None


class OverfitConfig(DetectorConfig):
    """Validation loss rising while training loss falls.

    Fires when, after ``min_evals`` validation points, the last ``patience`` of them are all at
    least ``min_rise`` (relative) above the best validation loss and the latest is not the lowest
    of them (a bump coming back down is not overfitting), while the smoothed training loss
    (median of ``window`` points) has fallen by ``min_train_drop`` since that best. The
    validation loss is the median of the last ``val_window`` evaluations (small validation sets
    are noisy). Overfitting again after a best at least ``min_rise`` better than the one last
    reported is a new finding (it names a better checkpoint to keep).
    """

    val_window: int = Field(1, ge=1)
    min_evals: int = Field(4, ge=2)
    patience: int = Field(3, ge=1)
    min_rise: float = Field(0.15, ge=0.0)
    min_train_drop: float = Field(0.05, ge=0.0)
    window: int = Field(20, ge=1)
    breakthrough: float | None = None


class StallConfig(DetectorConfig):
    """Heartbeats keep coming while the step does not move.

    Fires after ``min_heartbeats`` training heartbeats without progress that also span at least
    ``max(min_seconds, factor * typical seconds per step)``; critical after ``critical_after_s``.
    Only heartbeats whose phase is in ``phases`` count (``null`` = the agent did not say).
    """

    min_heartbeats: int = Field(12, ge=1)
    min_seconds: float = Field(120.0, ge=0.0)
    factor: float = Field(50.0, ge=0.0)
    critical_after_s: float = Field(900.0, ge=0.0)
    phases: list[str | None] = ["training", None]
    breakthrough: float | None = None


class ThroughputConfig(DetectorConfig):
    """Throughput (samples/s) fell below ``1 - drop`` of its best sustained level.

    Levels are medians of ``window`` points; the best is the highest such median after
    ``warmup`` points. Without a throughput key the detector uses steps per second from the
    loss points' timestamps instead.
    """

    key: str = "throughput"
    window: int = Field(10, ge=2)
    warmup: int = Field(0, ge=0)
    drop: float = Field(0.5, gt=0.0, lt=1.0)
    derive_every: int = Field(10, ge=2)
    breakthrough: float | None = 2.0


class GpuUtilConfig(DetectorConfig):
    """Device utilisation low while training progresses (an input bottleneck), from heartbeats.

    The mean utilisation over the last ``window`` training heartbeats that saw the step advance,
    after skipping ``warmup`` of them, is under ``threshold`` percent. It also names GPUs that
    sit idle (under ``idle_gpu`` percent) while others work.
    """

    window: int = Field(12, ge=1)
    warmup: int = Field(4, ge=0)
    threshold: float = Field(30.0, ge=0.0, le=100.0)
    idle_gpu: float = Field(5.0, ge=0.0, le=100.0)
    breakthrough: float | None = None


class CrashConfig(DetectorConfig):
    """An attempt ended with a non-zero exit code (a traceback, or a signal such as SIGKILL).

    Attempts ended on purpose (``ignore_reasons``: a pause, a stop, a lost box) are not crashes.
    """

    ignore_reasons: list[str] = [
        "paused",
        "pause",
        "stopped",
        "stop",
        "cancelled",
        "cancel",
        "box_lost",
        "lost",
        "preempted",
    ]
    breakthrough: float | None = None


DEFAULT_ALIASES: dict[str, list[str]] = {
    "loss": ["loss", "train_loss", "train/loss", "training_loss"],
    "val_loss": ["val_loss", "val/loss", "valid_loss", "validation_loss", "eval_loss", "eval/loss"],
    "grad_norm": ["grad_norm", "train/grad_norm", "gradient_norm", "grad-norm"],
    "throughput": ["throughput", "samples_per_sec", "samples/s", "train/samples_per_second"],
}


class MonitorConfig(_Strict):
    """Every detector's settings, plus which metric keys mean what (``aliases``)."""

    nan: NanConfig = Field(default_factory=NanConfig)
    divergence: DivergenceConfig = Field(default_factory=DivergenceConfig)
    spike: SpikeConfig = Field(default_factory=SpikeConfig)
    plateau: PlateauConfig = Field(default_factory=PlateauConfig)
    overfit: OverfitConfig = Field(default_factory=OverfitConfig)
    stall: StallConfig = Field(default_factory=StallConfig)
    throughput: ThroughputConfig = Field(default_factory=ThroughputConfig)
    gpu_util: GpuUtilConfig = Field(default_factory=GpuUtilConfig)
    crash: CrashConfig = Field(default_factory=CrashConfig)
    aliases: dict[str, list[str]] = Field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_ALIASES.items()})

    @field_validator("aliases")
    @classmethod
    def _aliases_cover_canonical(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        merged = {k: list(vals) for k, vals in DEFAULT_ALIASES.items()}
        merged.update(v)
        return merged

    def canonical_keys(self) -> dict[str, str]:
        """The user's metric key -> the canonical name the detectors read."""
        out: dict[str, str] = {}
        for canon, names in self.aliases.items():
            out[canon] = canon
            for name in names:
                out.setdefault(name, canon)
        return out

    def with_overrides(self, overrides: dict[str, Any] | None) -> MonitorConfig:
        """A copy with ``overrides`` (nested dicts) merged in; raises ``BadSpec`` on anything unknown."""
        if not overrides:
            return self
        base = self.model_dump()
        merged = _deep_merge(base, overrides)
        try:
            return MonitorConfig.model_validate(merged)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise BadSpec(
                f"bad monitor setting {where}: {first['msg']}",
                hint="see docs/monitor.md for the detectors and their settings",
            ) from exc


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "aliases":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["divergence.k=6", "stall.enabled=false"]`` -> ``{"divergence": {"k": 6}, ...}``.

    Values are read as JSON when they parse (numbers, booleans, lists, null), else as strings.
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise BadSpec(f"monitor setting {item!r} is not NAME=VALUE", hint="e.g. divergence.k=6")
        path, raw = item.split("=", 1)
        parts = [p for p in path.strip().split(".") if p]
        if not parts:
            raise BadSpec(f"monitor setting {item!r} has no name", hint="e.g. divergence.k=6")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise BadSpec(f"monitor setting {item!r} conflicts with another one")
        node[parts[-1]] = value
    return out
