"""One embedded control plane (``choline up``) per module, in its own CHOLINE_HOME, driven through
the real CLI as a user would; ``choline down`` at the end."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass
class ControlPlane:
    home: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHOLINE_")}
        env.update(CHOLINE_HOME=str(self.home), PYTHONUNBUFFERED="1", **extra)
        return env

    def cli(
        self, *args: str, cwd: Path | None = None, timeout: float = 300, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "choline.cli.main", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env=self.env(**extra),
        )

    @contextlib.contextmanager
    def running(self, timeout: float = 120, **env: str) -> Iterator[ControlPlane]:
        """``choline up`` with ``env``, then ``choline down`` in every case (a failed ``up`` may leave
        components running)."""
        up = self.cli("up", timeout=timeout, **env)
        try:
            log = self.home / "logs" / "supervisor.log"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            assert up.returncode == 0, up.stderr[-3000:] + tail
            yield self
        finally:
            self.cli("down", timeout=120)

    def live_boxes(self) -> list[Path]:
        from choline_provisioner.providers import localbox

        boxes = self.home / "boxes"
        if not boxes.is_dir():
            return []
        return [d for d in boxes.iterdir() if localbox.box_state(d) in ("running", "loading")]


@pytest.fixture(scope="module")
def controlplane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    cp = ControlPlane(tmp_path_factory.mktemp("cp-home"))
    with cp.running(CHOLINE_LOSS_TIMEOUT_S="5", CHOLINE_HEARTBEAT_S="1"):
        yield cp
