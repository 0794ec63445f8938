"""Fixtures for the training library's tests: a run folder per test, and no run left open between tests."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _finish_runs() -> Iterator[None]:
    yield
    import sys

    if "choline.train" in sys.modules:
        from choline.train import current_run

        run = current_run()
        if run is not None:
            run.finish()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def train_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="choline.train")
    return caplog
