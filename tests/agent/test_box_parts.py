"""The agent's parts that need no control plane: code bundles unpacked safely, artifacts chosen from what
the script changed, environments built on the base interpreter (real venv and pip, no downloads)."""

from __future__ import annotations

import os
import sys
import tarfile
from pathlib import Path

import pytest

from choline_agent import artifacts, envs
from choline_agent.agent import traceback_tail
from choline_agent.transfer import UnsafeArchive, safe_extract
from choline_core.pipeline import EnvSpec

from .conftest import bundle


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = 3 if kind == tarfile.REGTYPE else 0
    return info


def test_safe_extract_unpacks_an_ordinary_bundle(tmp_path: Path) -> None:
    tar = tmp_path / "b.tar.gz"
    link = member("pkg/alias", tarfile.SYMTYPE, "mod.py")
    tar.write_bytes(bundle({"train.py": "print(1)\n", "pkg/mod.py": "x = 1\n"}, extra=[link]))
    assert safe_extract(tar, tmp_path / "out") == 2
    assert (tmp_path / "out" / "pkg" / "alias").read_text() == "x = 1\n"


@pytest.mark.parametrize(
    "bad",
    [
        member("../up.txt"),
        member("/abs.txt"),
        member("a/../../up.txt"),
        member("link", tarfile.SYMTYPE, "/etc/passwd"),
        member("d/link", tarfile.SYMTYPE, "../../x"),
        member("hard", tarfile.LNKTYPE, "../x"),
        member("dev", tarfile.CHRTYPE),
        member("fifo", tarfile.FIFOTYPE),
    ],
    ids=lambda m: m.name,
)
def test_safe_extract_refuses_what_reaches_outside(tmp_path: Path, bad: tarfile.TarInfo) -> None:
    tar = tmp_path / "b.tar.gz"
    tar.write_bytes(bundle({"train.py": "print(1)\n"}, extra=[bad]))
    with pytest.raises(UnsafeArchive):
        safe_extract(tar, tmp_path / "out" / "code")
    assert not (tmp_path / "out" / "up.txt").exists() and not (tmp_path / "up.txt").exists()


def test_safe_extract_refuses_garbage(tmp_path: Path) -> None:
    tar = tmp_path / "b.tar.gz"
    tar.write_bytes(b"not a tarball")
    with pytest.raises(UnsafeArchive, match="not a readable"):
        safe_extract(tar, tmp_path / "out")


def test_artifacts_are_what_changed_bundles_first_within_the_limit(tmp_path: Path) -> None:
    root = tmp_path / "code"
    (root / "sub").mkdir(parents=True)
    (root / "train.py").write_text("x")
    (root / "keep.txt").write_text("same")
    before = artifacts.snapshot(root)
    (root / "out.txt").write_text("new")
    (root / "train.py").write_text("changed")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "m.pyc").write_bytes(b"0")
    (root / "big.bin").write_bytes(b"0" * 5000)
    (root / "model").mkdir()
    (root / "model" / "card.json").write_text("{}")
    (root / "model" / "weights.safetensors").write_bytes(b"1" * 100)
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("announced")
    chosen, left = artifacts.collect(root, before, [(outside, "report.txt")], 1000, tmp_path / "scratch")
    names = [i.name for i in chosen]
    assert names[0] == "model.choline-bundle.tar.gz" and chosen[0].bundle
    assert names[1] == "report.txt"
    assert set(names) == {"model.choline-bundle.tar.gz", "report.txt", "out.txt", "train.py"}
    assert [i.name for i in left] == ["big.bin"]
    with tarfile.open(chosen[0].path) as tf:
        assert sorted(tf.getnames()) == ["model/card.json", "model/weights.safetensors"]


def test_traceback_tail_starts_at_the_last_traceback() -> None:
    last = ["Traceback (most recent call last):", '  File "t.py", line 1', "ValueError: last"]
    lines = ["noise", "Traceback (most recent call last):", "  old", "E: first", "more", *last]
    assert traceback_tail(lines).splitlines() == last
    assert traceback_tail(["a", "b"]) == "a\nb"


@pytest.mark.slow
def test_env_reuses_the_base_torch_and_is_built_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    spec = EnvSpec(python="3.11", requirements=["torch>=2.0", "numpy"], source="requirements.txt")
    log = tmp_path / "install.log"
    first = envs.build(spec, spec.digest(), tmp_path / "envs", sys.executable, log, dict(os.environ))
    assert not first.reused and first.venv is not None
    assert first.torch is not None and first.torch_source == "base", log.read_text()[-2000:]
    assert "Requirement already satisfied: torch" in log.read_text()
    second = envs.build(spec, spec.digest(), tmp_path / "envs", sys.executable, log, dict(os.environ))
    assert second.reused and second.venv == first.venv and second.torch == first.torch
    # the venv's own interpreter imports the base's packages, editable installs included
    import subprocess

    out = subprocess.run(
        [second.python, "-c", "import choline_core, numpy, sys; print(sys.prefix)"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(first.venv)


@pytest.mark.slow
def test_env_install_failure_has_the_log_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    spec = EnvSpec(requirements=["numpy>=999"], source="requirements.txt")
    with pytest.raises(envs.EnvError) as info:
        envs.build(spec, spec.digest(), tmp_path / "envs", sys.executable, tmp_path / "install.log", dict(os.environ))
    assert "installing the requirements failed" in info.value.message
    assert "numpy>=999" in info.value.log_tail
    assert not (tmp_path / "envs" / spec.digest()[:16] / envs.READY).exists()
