import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from choline_core import faults

SCRIPT = """
import sys
from choline_core.faults import barrier
for i in range(1, 4):
    print("before", i, flush=True)
    barrier("demo.point")
    print("after", i, flush=True)
"""


def run(env_faults: str, tmp_path: Path, *, wait: bool = True) -> subprocess.Popen[str]:
    env = dict(os.environ, CHOLINE_FAULTS=env_faults, CHOLINE_FAULTS_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, stdout=subprocess.PIPE, text=True)
    if wait:
        proc.wait(30)
    return proc


def test_no_faults_is_a_no_op(tmp_path: Path) -> None:
    proc = run("", tmp_path)
    assert proc.returncode == 0
    assert proc.stdout is not None and proc.stdout.read().count("after") == 3


def test_crash_kills_at_the_named_point(tmp_path: Path) -> None:
    proc = run("demo.point=crash@2", tmp_path)
    assert proc.returncode == -signal.SIGKILL
    assert proc.stdout is not None
    assert proc.stdout.read().split("\n")[:4] == ["before 1", "after 1", "before 2", ""]


def test_exit_code(tmp_path: Path) -> None:
    proc = run("demo.point=exit:7", tmp_path)
    assert proc.returncode == 7


def test_pause_until_released(tmp_path: Path) -> None:
    proc = run("demo.point=pause@3", tmp_path, wait=False)
    pid = faults.wait_reached("demo.point", tmp_path, timeout=30)
    assert pid == proc.pid
    assert proc.poll() is None  # held at the barrier
    faults.release("demo.point", tmp_path)
    assert proc.wait(30) == 0
    assert proc.stdout is not None and proc.stdout.read().count("after") == 3


def test_raise_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHOLINE_FAULTS", "x.y=raise")
    faults.reload()
    try:
        faults.barrier("other.name")  # not named: nothing happens
        with pytest.raises(faults.FaultInjected):
            faults.barrier("x.y")
    finally:
        monkeypatch.delenv("CHOLINE_FAULTS")
        faults.reload()
    faults.barrier("x.y")


def test_bad_spec_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHOLINE_FAULTS", "x=explode")
    with pytest.raises(ValueError, match="unknown action"):
        faults.reload()
    monkeypatch.delenv("CHOLINE_FAULTS")
    faults.reload()


AT_SCRIPT = """
from choline_core.faults import barrier
for step in range(1, 8):
    barrier("train.step", at=step)
    print("step", step, flush=True)
"""


def test_pause_at_a_step_then_pass_once_released(tmp_path: Path) -> None:
    env = dict(os.environ, CHOLINE_FAULTS="train.step=pause#3,train.step=pause#5", CHOLINE_FAULTS_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", AT_SCRIPT], env=env, stdout=subprocess.PIPE, text=True)
    faults.wait_reached("train.step#3", tmp_path)
    assert not (tmp_path / "train.step#5.reached").exists()
    faults.release("train.step#3", tmp_path)
    faults.wait_reached("train.step#5", tmp_path)
    faults.release("train.step#5", tmp_path)
    assert proc.wait(30) == 0
    # a later process passing the same steps goes straight through: they were released
    again = subprocess.run([sys.executable, "-c", AT_SCRIPT], env=env, capture_output=True, text=True, timeout=30)
    assert again.returncode == 0 and again.stdout.count("step") == 7
