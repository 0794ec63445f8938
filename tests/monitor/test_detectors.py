"""Each detector on crafted streams: it fires on the problem and stays quiet on the look-alikes."""

from __future__ import annotations

import pytest

from choline_monitor.config import (
    CrashConfig,
    DivergenceConfig,
    GpuUtilConfig,
    NanConfig,
    OverfitConfig,
    PlateauConfig,
    SpikeConfig,
    StallConfig,
    ThroughputConfig,
)
from choline_monitor.detectors import (
    CrashDetector,
    DivergenceDetector,
    End,
    GpuUtilDetector,
    NanDetector,
    OverfitDetector,
    PlateauDetector,
    Point,
    SpikeDetector,
    StallDetector,
    ThroughputDetector,
)
from choline_monitor.detectors.base import Beat, GpuUtil

from .streams import T0, beats, decaying, noisy, pts, run


# ------------------------------------------------------------------------------------- nan
def test_nan_in_loss_fires_at_once_with_the_step_and_last_finite_value() -> None:
    sigs = run(NanDetector(NanConfig()), pts("loss", [2.0, 1.5, 1.2, float("nan"), None]))
    assert [s.step for s in sigs] == [4, 5]
    assert sigs[0].severity == "critical"
    assert sigs[0].evidence["key"] == "loss" and sigs[0].evidence["value"] == "nan"
    assert sigs[0].evidence["last_finite"] == [3, 1.2]


def test_nan_single_inf_grad_norm_is_mixed_precision_noise_but_three_in_a_row_is_not() -> None:
    det = NanDetector(NanConfig())
    one = pts("grad_norm", [1.0, float("inf"), 1.0, 1.1])
    assert run(det, one) == []
    three = pts("grad_norm", [1.0, float("inf"), float("inf"), float("inf")], start=10)
    sigs = run(det, three)
    assert [s.step for s in sigs] == [13] and sigs[0].evidence["value"] == "inf"


def test_nan_ignores_keys_it_does_not_watch_and_validation_nan_counts() -> None:
    det = NanDetector(NanConfig())
    assert run(det, pts("acc", [None, None])) == []
    assert [s.evidence["key"] for s in run(det, pts("val_loss", [0.5, float("-inf")]))] == ["val_loss"]


# ------------------------------------------------------------------------------ divergence
def test_divergence_fires_when_the_loss_climbs_k_times_above_its_best() -> None:
    stream = decaying(300, 2.3, 0.1) + noisy(60, 1.5, seed=1)  # a learning-rate jump at step 301
    sigs = run(DivergenceDetector(DivergenceConfig()), pts("loss", stream))
    assert sigs, "a loss 15x its best must be divergence"
    first = sigs[0]
    assert first.severity == "critical" and 300 < first.step <= 320
    assert first.evidence["ratio"] >= 4 and first.evidence["best"] < 0.2


def test_divergence_quiet_on_healthy_decay_and_on_noise_around_a_tiny_loss() -> None:
    assert run(DivergenceDetector(DivergenceConfig()), pts("loss", decaying(800, rel=0.3))) == []
    # a loss near zero: 6x its best in ratio, but a rounding error next to the progress made
    stream = decaying(300, 2.3, 0.001, rel=0.05) + noisy(100, 0.006, rel=0.3, seed=3)
    assert run(DivergenceDetector(DivergenceConfig()), pts("loss", stream)) == []


def test_divergence_waits_for_warm_up_and_respects_k() -> None:
    warmup = DivergenceConfig().warmup
    early = [2.3] * 5 + [20.0] * (warmup - 6)  # blows up, but warm-up is not over
    assert run(DivergenceDetector(DivergenceConfig()), pts("loss", early)) == []
    stream = decaying(200, 2.0, 0.5) + noisy(50, 2.0, seed=4)  # 4x its best
    assert run(DivergenceDetector(DivergenceConfig(k=6)), pts("loss", stream)) == []
    assert run(DivergenceDetector(DivergenceConfig(k=3)), pts("loss", stream))


def test_divergence_from_the_first_steps_compares_with_the_untrained_loss() -> None:
    stream = [0.7, 4.2, 3.1e5, *noisy(100, 2e6, rel=0.5)]  # a learning rate far too high
    sigs = run(DivergenceDetector(DivergenceConfig()), pts("loss", stream))
    assert sigs and sigs[0].step == DivergenceConfig().warmup and sigs[0].evidence["best"] == 0.7


def test_divergence_with_a_negative_loss_floor() -> None:
    # a negative log-likelihood bounded below by -3: ratios are taken above the floor
    stream = [x - 3 for x in decaying(200, 2.0, 0.2)] + [x - 3 for x in noisy(40, 2.5, seed=5)]
    assert run(DivergenceDetector(DivergenceConfig(loss_floor=-3.0)), pts("loss", stream))
    assert run(DivergenceDetector(DivergenceConfig()), pts("loss", stream)) == []  # floor 0: best <= 0


# ----------------------------------------------------------------------------------- spike
def test_spike_fires_on_one_bad_batch_only() -> None:
    stream = decaying(400, 2.3, 0.3, rel=0.15)
    stream[250] = 40.0
    sigs = run(SpikeDetector(SpikeConfig()), pts("loss", stream))
    assert [s.step for s in sigs] == [251]
    assert sigs[0].severity == "warning" and sigs[0].evidence["ratio"] > 50


def test_spike_quiet_on_heavy_tailed_minibatch_noise_of_a_tiny_loss() -> None:
    stream = decaying(300, 2.3, 0.005, rel=0.3)
    for i in range(120, 300, 37):
        stream[i] = 0.3  # 60x the median, but small next to the loss's starting level
    assert run(SpikeDetector(SpikeConfig()), pts("loss", stream)) == []
    assert run(SpikeDetector(SpikeConfig(min_jump=0.0)), pts("loss", stream))


def test_spike_on_gradient_norm_and_keys_are_separate() -> None:
    det = SpikeDetector(SpikeConfig())
    g = noisy(200, 1.0, rel=0.2)
    g[150] = 60.0
    sigs = run(det, pts("grad_norm", g) + pts("loss", noisy(200, 2.0)))
    assert [(s.evidence["key"], s.step) for s in sigs] == [("grad_norm", 151)]


# --------------------------------------------------------------------------------- plateau
def test_plateau_fires_on_a_loss_that_never_learns() -> None:
    sigs = run(PlateauDetector(PlateauConfig()), pts("loss", noisy(600, 2.3, rel=0.05)))
    assert sigs and sigs[0].severity == "warning"
    assert sigs[0].evidence["kind"] == "stuck"
    patience = PlateauConfig().patience_steps
    assert patience <= sigs[0].step <= patience + 120


def test_plateau_after_an_early_blow_up_is_stuck_not_converged() -> None:
    # a learning rate far too high: the loss explodes, then sits at the untrained level (a dead network)
    stream = [2.3, 6.4, 126.0, 2059.0, 4881.0, 5492.0, 380.0, 35.0] * 3 + noisy(500, 2.35, rel=0.03)
    sigs = run(PlateauDetector(PlateauConfig()), pts("loss", stream))
    assert sigs and sigs[0].evidence["kind"] == "stuck" and sigs[0].evidence["initial"] == 2.3


def test_plateau_quiet_while_learning_and_converged_only_on_request() -> None:
    assert run(PlateauDetector(PlateauConfig()), pts("loss", decaying(800, rel=0.05))) == []
    converged = decaying(300, 2.3, 0.05, rel=0.02) + noisy(400, 0.05, rel=0.02, seed=9)
    assert run(PlateauDetector(PlateauConfig()), pts("loss", converged)) == []
    sigs = run(PlateauDetector(PlateauConfig(converged=True)), pts("loss", converged))
    assert sigs and sigs[0].severity == "info" and sigs[0].evidence["kind"] == "converged"


# --------------------------------------------------------------------------------- overfit
def _with_val(train: list[float], val: list[float], every: int) -> list[Point]:
    obs = pts("loss", train)
    out: list[Point] = []
    vi = 0
    for p in obs:
        out.append(p)
        if p.step % every == 0 and vi < len(val):
            out.append(Point(p.step, "val_loss", val[vi], p.t, 1))
            vi += 1
    return out


def test_overfit_fires_when_validation_rises_while_training_falls() -> None:
    train = decaying(1000, 2.3, 0.01, rel=0.05)
    val = [2.0, 1.2, 0.8, 0.6, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0]
    sigs = run(OverfitDetector(OverfitConfig()), _with_val(train, val, 100))
    assert sigs
    assert sigs[0].step == 900 and sigs[0].evidence["best_step"] == 500  # 0.7, 0.8, 0.9: three evals 10% up
    assert sigs[0].evidence["train_loss"] < sigs[0].evidence["train_loss_at_best"]


def test_overfit_after_a_new_best_is_a_new_episode() -> None:
    train = decaying(1200, 2.3, 0.01, rel=0.02)
    val = [2.0, 1.2, 0.8, 0.6, 0.8, 0.9, 1.0, 0.5, 0.7, 0.8, 0.9]
    sigs = run(OverfitDetector(OverfitConfig()), _with_val(train, val, 100))
    keys = [s.episode_key for s in sigs]
    assert keys[0] == "best-400" and keys[-1] == "best-800"
    assert sigs[-1].evidence["best_step"] == 800


def test_overfit_quiet_when_both_rise_or_validation_only_wobbles() -> None:
    rising = decaying(500, 2.3, 0.5) + noisy(500, 1.5, seed=2)  # training got worse too: not overfitting
    val = [2.0, 1.2, 0.8, 0.6, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4]
    assert run(OverfitDetector(OverfitConfig()), _with_val(rising, val, 100)) == []
    train = decaying(1000, 2.3, 0.01)
    wobble = [2.0, 1.2, 0.8, 0.6, 0.62, 0.58, 0.63, 0.57, 0.6, 0.59]
    assert run(OverfitDetector(OverfitConfig()), _with_val(train, wobble, 100)) == []


# ----------------------------------------------------------------------------------- stall
def test_stall_fires_when_heartbeats_continue_without_progress() -> None:
    steps = [100 * i for i in range(1, 11)] + [1000] * 40  # 10 beats of progress, then frozen
    sigs = run(StallDetector(StallConfig()), beats(steps, dt=5.0))
    assert sigs
    first = sigs[0]
    assert first.step == 1000 and first.severity == "warning"
    assert first.evidence["silent_s"] >= 120 and first.evidence["heartbeats"] >= 12
    assert first.t == pytest.approx(T0 + 9 * 5.0 + 120, abs=5.0)


def test_stall_escalates_to_critical_and_ignores_other_phases_and_pauses() -> None:
    steps = [100, 200] + [200] * 200
    sigs = run(StallDetector(StallConfig()), beats(steps, dt=5.0))
    assert sigs[-1].severity == "critical"
    assert run(StallDetector(StallConfig()), beats([100, 200] + [200] * 100, phase="uploading")) == []
    det = StallDetector(StallConfig())
    run(det, beats([100, 200], dt=5.0))
    det.on_active(False, T0 + 10)  # paused
    assert run(det, beats([200] * 100, t0=T0 + 15)) == []


def test_stall_uses_metric_points_as_progress_and_scales_with_slow_steps() -> None:
    def stream(points_until: int) -> list[Point | Beat]:
        obs: list[Point | Beat] = []
        for i in range(80):  # a point every 5 s (until points_until), heartbeats that carry no step
            if i < points_until:
                obs.append(Point(i + 1, "loss", 1.0, T0 + 5 * i, 1))
            obs.append(Beat(T0 + 5 * i + 1, None, "training", (), None, 1))
        return obs

    assert run(StallDetector(StallConfig()), stream(80)) == []
    sigs = run(StallDetector(StallConfig()), stream(10))
    assert sigs and sigs[0].step == 10
    slow = StallDetector(StallConfig())  # 10 s a step: 50 steps' worth (500 s) is the threshold
    sigs = run(slow, beats([1, 2, 3, 4, 5] + [5] * 60, dt=10.0))
    assert sigs and sigs[0].evidence["threshold_s"] == pytest.approx(500, rel=0.05)
    assert sigs[0].evidence["silent_s"] >= 500


# ------------------------------------------------------------------------------ throughput
def test_throughput_drop_fires_and_steady_noise_does_not() -> None:
    thr = noisy(40, 1000.0, rel=0.15) + noisy(30, 200.0, rel=0.15, seed=1)
    sigs = run(ThroughputDetector(ThroughputConfig()), pts("throughput", thr))
    assert sigs and sigs[0].step > 40 and sigs[0].evidence["fraction"] < 0.5
    assert run(ThroughputDetector(ThroughputConfig()), pts("throughput", noisy(200, 1000.0, rel=0.2))) == []


def test_throughput_derived_from_loss_timestamps_without_a_throughput_key() -> None:
    fast = [Point(i, "loss", 1.0, T0 + 0.1 * i, 1) for i in range(1, 301)]
    slow = [Point(300 + i, "loss", 1.0, T0 + 30 + 0.5 * i, 1) for i in range(1, 301)]
    sigs = run(ThroughputDetector(ThroughputConfig()), fast + slow)
    assert sigs and sigs[0].evidence["unit"] == "steps/s"


# -------------------------------------------------------------------------------- gpu_util
def test_low_device_utilisation_while_training_progresses() -> None:
    steps = list(range(10, 400, 10))
    sigs = run(GpuUtilDetector(GpuUtilConfig()), beats(steps, util=12.0, cpu=100.0))
    assert sigs and sigs[0].evidence["util_mean"] == 12.0 and sigs[0].evidence["cpu_percent"] == 100.0
    assert run(GpuUtilDetector(GpuUtilConfig()), beats(steps, util=85.0)) == []


def test_gpu_util_leaves_a_frozen_run_to_the_stall_detector_and_names_idle_gpus() -> None:
    assert run(GpuUtilDetector(GpuUtilConfig()), beats([100] * 50, util=0.0)) == []
    det = GpuUtilDetector(GpuUtilConfig())
    obs = [
        Beat(T0 + 5 * i, 10 * i, "training", tuple(GpuUtil(g, 95.0 if g < 2 else 0.0) for g in range(4)), 50.0, 1)
        for i in range(1, 30)
    ]
    sigs = run(det, obs)
    assert sigs and sigs[0].evidence["idle_gpus"] == ["2", "3"]


def test_gpu_util_without_gpu_reports_says_nothing() -> None:
    assert run(GpuUtilDetector(GpuUtilConfig()), beats(list(range(10, 400, 10)), util=None)) == []


# ----------------------------------------------------------------------------------- crash
TRACEBACK = """Traceback (most recent call last):
  File "train.py", line 88, in <module>
    loss = criterion(model(x), y)
IndexError: Target 17 is out of bounds.
"""


@pytest.mark.parametrize(
    ("code", "reason", "tb", "expect"),
    [
        (1, "exited", TRACEBACK, "IndexError: Target 17 is out of bounds."),
        (-9, "exited", None, "killed by SIGKILL"),
        (137, "exited", None, "killed by SIGKILL"),
        (3, "exited", None, "exited with code 3"),
        (-9, "exited", "train.py:40: UserWarning: careful\n  x = float(loss)\n", "killed by SIGKILL"),
        (2, "exited", "WARNING some library said something\n", "exited with code 2"),
        (1, "exited", "UserWarning: noise\n" + TRACEBACK + "  a log line after it\n", "IndexError: Target 17"),
        (0, "exited", None, None),
        (-15, "stopped", None, None),
        (None, "box_lost", None, None),
    ],
)
def test_crash(code: int | None, reason: str, tb: str | None, expect: str | None) -> None:
    sigs = run(CrashDetector(CrashConfig()), [End(T0, 2, reason, code, 420, tb)])
    if expect is None:
        assert sigs == []
        return
    (s,) = sigs
    assert expect in s.message and s.severity == "critical" and s.step == 420
    assert s.episode_key == "attempt-2" and s.evidence["exit_code"] == code
