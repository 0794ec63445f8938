"""examples/digits/train.py: learns the digits, and a run SIGKILLed mid-epoch resumes to the same model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ._procs import REPO, assert_same_history, assert_same_weights, attempts, launch

SCRIPT = str(REPO / "examples" / "digits" / "train.py")


@pytest.mark.slow
def test_digits_trains_and_resumes_exactly(tmp_path: Path) -> None:
    common = ["--epochs", "3", "--checkpoint-every", "10"]
    ref = launch([SCRIPT, *common, "--run-dir", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = launch([SCRIPT, *common, "--run-dir", str(tmp_path / "cut")], faults="train.step=crash@57")
    assert killed.killed
    resumed = launch([SCRIPT, *common, "--run-dir", str(tmp_path / "cut")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert attempts(tmp_path / "cut")[1]["resumed_from_step"] in (40, 50)  # 50 unless its write was cut short
    assert_same_weights(tmp_path / "ref" / "model.safetensors", tmp_path / "cut" / "model.safetensors")
    assert_same_history(tmp_path / "ref", tmp_path / "cut")


@pytest.mark.parametrize("argv", [["--checkpoint-every", "often"], ["--checkpoint-every", "0"], ["--lr", "-1"]])
def test_digits_refuses_bad_arguments(tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("digits_train", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exc:
        module.main([*argv, "--run-dir", str(tmp_path / "r")])
    assert exc.value.code == 2 and argv[0] in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
