"""Live control of real processes: SIGTERM is a pause (checkpoint, exit 75, an exact resume); a loop that
does not poll is terminated after the grace; the local channel's command line steers a running script."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from choline.train.control import CONTROL_LOG, read_records
from choline_core import agent_protocol as proto

from ._procs import HERE, REPO, assert_same_weights, attempts, clean_env, launch

pytestmark = pytest.mark.slow

SCRIPT = HERE / "scripts" / "control_train.py"


def start(run_dir: Path, out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "--run-dir", str(run_dir), "--out", str(out), *extra],
        env=clean_env(**(env or {})),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_line(proc: subprocess.Popen[str], prefix: str, timeout: float = 60) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"no line starting with {prefix!r}; stderr: {proc.stderr.read() if proc.stderr else ''}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ref")
    r = launch([str(SCRIPT), "--run-dir", str(d / "run"), "--out", str(d / "final.safetensors")])
    assert r.returncode == 0, r.stderr
    return d / "final.safetensors"


def test_sigterm_pauses_with_a_checkpoint_and_exit_75(tmp_path: Path, reference: Path) -> None:
    run_dir, out = tmp_path / "run", tmp_path / "final.safetensors"
    proc = start(run_dir, out, "--sleep", "0.2")
    wait_for_line(proc, "step 6")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == proto.EXIT_PAUSED, err[-2000:]
    recs = read_records(run_dir / CONTROL_LOG)
    assert [(r["action"], r["source"], r["ok"]) for r in recs] == [("pause", "signal", True)]
    paused_at = recs[0]["step"]
    assert proto.read_manifest(run_dir / "checkpoints" / str(paused_at)).step == paused_at
    r = launch([str(SCRIPT), "--run-dir", str(run_dir), "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert attempts(run_dir)[-1]["resumed_from_step"] == paused_at
    assert_same_weights(reference, out)


def test_a_loop_that_does_not_poll_is_terminated_after_the_grace(tmp_path: Path) -> None:
    proc = start(tmp_path / "run", tmp_path / "x", "--idle", env={"CHOLINE_SIGTERM_GRACE": "1"})
    wait_for_line(proc, "idle")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM
    assert 0.9 < time.monotonic() - t0 < 20
    assert "no poll point came in time" in err


def test_the_command_line_steers_a_running_script(tmp_path: Path) -> None:
    run_dir, out = tmp_path / "run", tmp_path / "final.safetensors"
    proc = start(run_dir, out, "--sleep", "0.2")
    wait_for_line(proc, "step 2")
    tool = [sys.executable, "-m", "choline.train.channel", str(run_dir)]
    assert subprocess.run([*tool, "set", "lr=0.01"], env=clean_env(), capture_output=True).returncode == 0
    line = wait_for_line(proc, "step 5")
    assert subprocess.run([*tool, "stop"], env=clean_env(), capture_output=True).returncode == 0
    done = wait_for_line(proc, "done")
    proc.communicate(timeout=60)
    assert proc.returncode == 0
    stopped_at = int(done.split()[1])
    assert 5 <= stopped_at < 24, line
    recs = read_records(run_dir / CONTROL_LOG)
    assert [(r["action"], r["ok"]) for r in recs] == [("set", True), ("stop", True)]
    assert recs[0]["effect"]["lr"]["0"] == 0.01
    assert proto.read_manifest(run_dir / "checkpoints" / str(stopped_at)).reason == "final"
