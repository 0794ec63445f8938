"""A whole embedded control plane (``choline up``) per test module, as for the end-to-end tests, and a
``DatasetRemote`` that talks to its gateway in-process; helpers that make dataset folders."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from choline.client import CholineClient
from choline.datasets.remote import DatasetRemote
from choline.datasets.state import LocalState
from choline_core.settings import CholineSettings
from choline_core.storage import S3Store
from tests.e2e import conftest as e2e
from tests.e2e.conftest import ControlPlane

controlplane = e2e.controlplane  # one `choline up` per test module, as in tests/e2e


@pytest.fixture
def remote(controlplane: ControlPlane, monkeypatch: pytest.MonkeyPatch) -> Iterator[DatasetRemote]:
    monkeypatch.setenv("CHOLINE_HOME", str(controlplane.home))
    api = CholineClient.from_settings(CholineSettings())
    r = DatasetRemote(api)
    yield r
    r.close()
    api.close()


@pytest.fixture
def objects(controlplane: ControlPlane, monkeypatch: pytest.MonkeyPatch) -> S3Store:
    """The control plane's bucket, with its own keys (to look at and damage objects behind its back)."""
    monkeypatch.setenv("CHOLINE_HOME", str(controlplane.home))
    return S3Store.from_settings(CholineSettings())


@pytest.fixture
def state(tmp_path: Path) -> Iterator[LocalState]:
    s = LocalState(tmp_path / "local-state.sqlite")
    yield s
    s.close()


def make_tree(root: Path, *, seed: int = 1, big: int = 3 << 20, small: int = 40) -> Path:
    """A dataset folder: a few MB-sized random files, many small ones, a duplicate, an executable, a link
    inside, an empty folder."""
    rng = random.Random(seed)
    (root / "images" / "train").mkdir(parents=True)
    (root / "empty").mkdir()
    for i in range(3):
        (root / f"big{i}.bin").write_bytes(rng.randbytes(big + rng.randrange(1 << 16)))
    for i in range(small):
        (root / "images" / "train" / f"{i:03d}.jpg").write_bytes(rng.randbytes(rng.randrange(100, 60_000)))
    (root / "images" / "dup.jpg").write_bytes((root / "images" / "train" / "001.jpg").read_bytes())
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "run.sh", 0o755)
    (root / "latest").symlink_to("big0.bin")
    (root / "images" / "first").symlink_to("train/000.jpg")
    return root


def snapshot(root: Path) -> dict[str, tuple[str, ...]]:
    """Every entry under ``root`` (but the pull state) with its bytes and mode, or link target."""
    out: dict[str, tuple[str, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir.parts[:1] == (".choline-dataset",):
            continue
        dirnames[:] = [d for d in dirnames if not (rel_dir == Path(".") and d == ".choline-dataset")]
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = (rel_dir / name).as_posix()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                import hashlib

                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), oct(p.stat().st_mode & 0o7777))
    return out
