"""What `choline run` ships: a deterministic, ignore-aware code bundle and the environment spec."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from choline.packaging import iter_files, pack_code, resolve_env
from choline_core.errors import UserError


def tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_ignores_defaults_gitignore_cholineignore_and_venvs(tmp_path: Path) -> None:
    tree(
        tmp_path,
        {
            "train.py": "print(1)",
            ".git/HEAD": "ref",
            "__pycache__/x.pyc": "",
            "choline-runs/r1/x": "",
            "data/a.bin": "big",
            ".gitignore": "data/\n*.log\n!keep.log\n",
            "a.log": "",
            "keep.log": "",
            "src/sub/secret.py": "",
            "src/sub/other.py": "",
            "src/sub/.cholineignore": "secret.py\n",
            "myenv/pyvenv.cfg": "",
            "myenv/lib/x.py": "",
        },
    )
    names = [rel for rel, _ in iter_files(tmp_path)]
    assert names == [".gitignore", "keep.log", "src/sub/.cholineignore", "src/sub/other.py", "train.py"]


def test_bundle_is_deterministic_and_content_addressed(tmp_path: Path) -> None:
    tree(tmp_path, {"train.py": "print(1)", "lib/m.py": "x = 1"})
    a = pack_code(tmp_path)
    (tmp_path / "train.py").touch()  # a new mtime, same content
    b = pack_code(tmp_path)
    assert a.digest == b.digest and a.data == b.data
    (tmp_path / "lib/m.py").write_text("x = 2")
    assert pack_code(tmp_path).digest != a.digest
    with tarfile.open(fileobj=io.BytesIO(a.data), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == ["lib/m.py", "train.py"]
        assert all(m.uid == 0 and not m.issym() for m in tar.getmembers())


def test_oversized_code_points_to_data(tmp_path: Path) -> None:
    tree(tmp_path, {"train.py": "print(1)"})
    (tmp_path / "weights.bin").write_bytes(b"\0" * 2_000_000)
    with pytest.raises(UserError) as err:
        pack_code(tmp_path, limit_mb=1)
    assert "--data" in err.value.one_line() and "weights.bin" in err.value.one_line()


def test_env_from_requirements_flag_file_pyproject_and_imports(tmp_path: Path) -> None:
    tree(
        tmp_path,
        {
            "train.py": "import numpy\nimport torch\nimport choline\nimport os\nimport helper\n",
            "helper.py": "import sklearn\n",
        },
    )
    spec = resolve_env(tmp_path / "train.py", tmp_path)
    assert spec.source == "imports"
    names = {r.split("=")[0].split(">")[0] for r in spec.requirements}
    assert {"numpy", "torch", "scikit-learn"} <= names
    assert "choline" not in names and "os" not in names
    assert any(r.startswith("torch>=") for r in spec.requirements)  # an installed torch of the series serves
    tree(tmp_path, {"pyproject.toml": '[project]\nname = "x"\ndependencies = ["numpy>=1.26", "choline"]\n'})
    spec = resolve_env(tmp_path / "train.py", tmp_path)
    assert spec.source == "pyproject" and spec.requirements == ["numpy>=1.26"]
    tree(tmp_path, {"requirements.txt": "# comment\nrequests==2.0  # pinned\n-r more.txt\n", "more.txt": "tqdm\n"})
    spec = resolve_env(tmp_path / "train.py", tmp_path)
    assert spec.source == "requirements.txt" and spec.requirements == ["requests==2.0", "tqdm"]
    custom = tree(tmp_path, {"reqs/custom.txt": "pandas\n"}) / "reqs/custom.txt"
    spec = resolve_env(tmp_path / "train.py", tmp_path, custom)
    assert spec.source == "flag" and spec.requirements == ["pandas"]
    assert spec.digest() == resolve_env(tmp_path / "train.py", tmp_path, custom).digest()


def test_unreadable_requirements_is_a_user_error(tmp_path: Path) -> None:
    tree(tmp_path, {"train.py": ""})
    with pytest.raises(UserError, match="cannot read requirements"):
        resolve_env(tmp_path / "train.py", tmp_path, tmp_path / "missing.txt")
