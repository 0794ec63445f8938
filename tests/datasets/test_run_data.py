"""``choline run --data PATH:NAME`` on the embedded control plane: the folder is pushed, the box fetches it,
and the script reads it through ``choline.data(name)`` and ``CHOLINE_DATA_DIR``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from .conftest import ControlPlane, make_tree

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SCRIPT = """\
import hashlib, os, pathlib, choline
d = choline.data("pix")
assert pathlib.Path(d).resolve() == (pathlib.Path(os.environ["CHOLINE_DATA_DIR"]) / "pix").resolve()
h = hashlib.sha256()
for p in sorted(pathlib.Path(d).rglob("*")):
    if p.is_file() and ".choline-dataset" not in p.parts:
        h.update(p.relative_to(d).as_posix().encode()); h.update(p.read_bytes())
print("DATA", h.hexdigest(), oct(os.stat(pathlib.Path(d) / "run.sh").st_mode & 0o777))
"""


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_run_with_data_reads_it_on_the_box(controlplane: ControlPlane, tmp_path: Path) -> None:
    images = make_tree(tmp_path / "images", seed=21, big=1 << 20, small=10)
    project = tmp_path / "project"
    project.mkdir()
    (project / "job.py").write_text(SCRIPT)
    out = controlplane.cli("run", "--data", f"{images}:pix", "job.py", "--1xcpu", cwd=project)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"DATA {tree_digest(images)} 0o755" in out.stdout
    assert "dataset pix: version" in out.stderr
    # again: nothing to push, the same bytes on the box
    out = controlplane.cli("run", "--data", f"{images}:pix", "job.py", "--1xcpu", cwd=project)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dataset pix: unchanged in object storage" in out.stderr
    assert f"DATA {tree_digest(images)}" in out.stdout
    listed = controlplane.cli("data", "ls", "--json")
    assert any(d["name"] == "pix" for d in __import__("json").loads(listed.stdout))


def test_bad_data_arguments_are_one_line(controlplane: ControlPlane, tmp_path: Path) -> None:
    (tmp_path / "job.py").write_text("print('never')\n")
    out = controlplane.cli("run", "--data", str(tmp_path / "missing"), "job.py", "--1xcpu", cwd=tmp_path)
    assert out.returncode == 1 and "does not exist" in out.stderr.strip().splitlines()[-1]
    (tmp_path / "d").mkdir()
    out = controlplane.cli("run", "--data", f"{tmp_path / 'd'}:../up", "job.py", "--1xcpu", cwd=tmp_path)
    assert out.returncode == 1 and "bad dataset name" in out.stderr.strip().splitlines()[-1]
    out = controlplane.cli("data", "pull", "no-such-dataset", str(tmp_path / "x"))
    assert out.returncode == 1 and "no dataset 'no-such-dataset'" in out.stderr


def test_scheduled_run_pre_stages_its_data(controlplane: ControlPlane, tmp_path: Path) -> None:
    images = make_tree(tmp_path / "later", seed=22, big=1 << 16, small=3)
    (tmp_path / "job.py").write_text("print('later')\n")
    out = controlplane.cli(
        "run", "--at", "+2h", "--detach", "--data", f"{images}:later", "job.py", "--1xcpu", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "data pre-staged: 1 dataset(s) verified in object storage before the start time" in out.stderr
    run_id = out.stdout.strip().splitlines()[-1]
    shown = controlplane.cli("data", "show", "later", "--json")
    assert shown.returncode == 0 and __import__("json").loads(shown.stdout)["latest"]["files"] == 8
    controlplane.cli("stop", run_id)
