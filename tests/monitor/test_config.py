"""The config model: documented defaults, per-run overrides, clear errors for bad ones."""

from __future__ import annotations

import pytest

from choline_core.errors import BadSpec
from choline_monitor.config import MonitorConfig, parse_overrides
from choline_monitor.detectors import DETECTOR_NAMES


def test_every_detector_has_a_config_section_and_defaults() -> None:
    cfg = MonitorConfig()
    for name in DETECTOR_NAMES:
        assert getattr(cfg, name).enabled is True
    assert cfg.divergence.k == 4.0
    assert cfg.canonical_keys()["train/loss"] == "loss"


def test_overrides_merge_deeply_and_leave_the_defaults_alone() -> None:
    base = MonitorConfig()
    cfg = base.with_overrides({"divergence": {"k": 6}, "stall": {"enabled": False}})
    assert cfg.divergence.k == 6 and cfg.divergence.window == base.divergence.window
    assert cfg.stall.enabled is False and base.stall.enabled is True
    aliased = base.with_overrides({"aliases": {"loss": ["my_loss"]}})
    assert aliased.canonical_keys()["my_loss"] == "loss"
    assert aliased.canonical_keys()["val/loss"] == "val_loss"  # the other defaults stay


def test_parse_overrides() -> None:
    assert parse_overrides(["divergence.k=6", "stall.enabled=false", 'nan.keys=["loss"]']) == {
        "divergence": {"k": 6},
        "stall": {"enabled": False},
        "nan": {"keys": ["loss"]},
    }
    assert parse_overrides(["throughput.key=tokens_per_s"]) == {"throughput": {"key": "tokens_per_s"}}


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"divergance": {"k": 6}}, "divergance"),
        ({"divergence": {"kk": 6}}, "divergence.kk"),
        ({"divergence": {"k": 0.5}}, "divergence.k"),
        ({"gpu_util": {"threshold": 300}}, "gpu_util.threshold"),
    ],
)
def test_bad_overrides_are_refused_by_name(overrides: dict[str, object], words: str) -> None:
    with pytest.raises(BadSpec) as exc:
        MonitorConfig().with_overrides(overrides)
    assert words in exc.value.one_line() and "docs/monitor.md" in exc.value.one_line()


def test_bad_override_syntax() -> None:
    with pytest.raises(BadSpec):
        parse_overrides(["divergence.k"])
    with pytest.raises(BadSpec):
        parse_overrides(["=3"])
