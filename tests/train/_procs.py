"""Launching the training scripts as real processes, killing them, comparing their results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from choline.train import history

HERE = Path(__file__).parent
TINY = HERE / "scripts" / "tiny_train.py"
REPO = HERE.parent.parent


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHOLINE_") or k == "CHOLINE_HOME"}
    env.update(extra)
    return env


@dataclass
class Result:
    returncode: int
    stderr: str

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL


def launch(argv: list[str], *, faults: str = "", timeout: float = 150, cwd: Path | None = None) -> Result:
    env = clean_env(CHOLINE_FAULTS=faults) if faults else clean_env()
    proc = subprocess.run(
        [sys.executable, *argv], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO
    )
    return Result(proc.returncode, proc.stderr)


def launch_ddp(argv: list[str], *, nproc: int = 2, faults: str = "", timeout: float = 200) -> Result:
    extra = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    if faults:
        extra["CHOLINE_FAULTS"] = faults
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *argv]
    proc = subprocess.run(cmd, env=clean_env(**extra), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    return Result(proc.returncode, proc.stderr)


def attempts(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "run.json").read_text())["attempts"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"


def assert_same_history(a: Path, b: Path) -> None:
    ha = [(p["step"], p["key"], p["value"]) for p in history(a)]
    hb = [(p["step"], p["key"], p["value"]) for p in history(b)]
    assert len(ha) > 0
    assert ha == hb
