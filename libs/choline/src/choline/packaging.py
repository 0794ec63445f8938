"""What ``choline run`` ships: the code bundle and the environment spec.

``pack_code(root)`` makes a deterministic gzip tarball of the working directory (sorted
entries, fixed times and owners), honouring ``.gitignore`` and ``.cholineignore`` files (at
any depth) on top of default excludes (``.git``, virtual environments, caches,
``choline-runs/``). The same tree always gives the same bytes, so its sha256 names it in
object storage and an unchanged tree uploads nothing.

``resolve_env(script, root, requirements)`` finds what the script needs: ``--requirements``,
else ``requirements.txt`` / ``pyproject.toml`` beside the script (or at the root), else the
script's imports resolved against the versions installed here.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import os
import re
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from choline_core.errors import UserError
from choline_core.pipeline import EnvSpec

DEFAULT_EXCLUDES = [
    ".git/",
    ".hg/",
    ".svn/",
    ".venv/",
    "venv/",
    ".env/",
    "env/",
    "__pycache__/",
    "*.pyc",
    "*.pyo",
    ".mypy_cache/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".ipynb_checkpoints/",
    "node_modules/",
    "choline-runs/",
    "*.egg-info/",
    ".DS_Store",
    ".tox/",
    ".nox/",
    "wandb/",
    "mlruns/",
    ".idea/",
    ".vscode/",
]
IGNORE_FILES = (".gitignore", ".cholineignore")
FIXED_MTIME = 1_577_836_800  # 2020-01-01: a fixed time keeps the bundle's bytes a function of content only
DEFAULT_LIMIT_MB = 100
#: Packages the box provides itself (the agent installs choline; GPU images ship torch).
PROVIDED = {"choline", "choline-core", "choline_core"}
TORCH_FAMILY = {"torch", "torchvision", "torchaudio"}


@dataclass
class CodeBundle:
    data: bytes
    digest: str
    files: list[tuple[str, int]] = field(default_factory=list)  # (path, size)

    @property
    def size(self) -> int:
        return len(self.data)


class _Ignore:
    """Gitignore rules gathered while walking down (patterns of a file apply below its folder)."""

    def __init__(self) -> None:
        import pathspec

        self._pathspec = pathspec
        self.rules: list[tuple[str, object]] = [("", pathspec.PathSpec.from_lines("gitignore", DEFAULT_EXCLUDES))]

    def add_dir(self, rel_dir: str, path: Path) -> None:
        for name in IGNORE_FILES:
            f = path / name
            if f.is_file():
                try:
                    lines = f.read_text(errors="replace").splitlines()
                except OSError:
                    continue
                self.rules.append((rel_dir, self._pathspec.PathSpec.from_lines("gitignore", lines)))

    def ignored(self, rel: str, is_dir: bool) -> bool:
        result = False
        for base, spec in self.rules:
            if base and not rel.startswith(base + "/"):
                continue
            sub = rel[len(base) + 1 :] if base else rel
            candidate = sub + "/" if is_dir else sub
            # last matching pattern wins, including negations ("!keep.txt")
            for pattern in spec.patterns:  # type: ignore[attr-defined]
                if pattern.include is None:
                    continue
                if pattern.match_file(candidate) is not None:
                    result = bool(pattern.include)
        return result


def iter_files(root: Path) -> list[tuple[str, Path]]:
    """Files to ship under ``root``: (relative posix path, path), sorted; links are skipped."""
    root = root.resolve()
    ignore = _Ignore()
    out: list[tuple[str, Path]] = []

    def walk(rel_dir: str, path: Path) -> None:
        ignore.add_dir(rel_dir, path)
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror}") from None
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if entry.is_symlink():
                continue
            if entry.is_dir():
                if (Path(entry.path) / "pyvenv.cfg").exists() or ignore.ignored(rel, True):
                    continue
                walk(rel, Path(entry.path))
            elif entry.is_file() and not ignore.ignored(rel, False):
                out.append((rel, Path(entry.path)))

    walk("", root)
    return out


def pack_code(root: Path, *, limit_mb: float = DEFAULT_LIMIT_MB) -> CodeBundle:
    """The working directory as a deterministic ``.tar.gz``; refuses bundles over ``limit_mb``."""
    files = iter_files(root)
    sizes = [(rel, p.stat().st_size) for rel, p in files]
    total = sum(s for _, s in sizes)
    if total > limit_mb * 1e6:
        biggest = sorted(sizes, key=lambda x: -x[1])[:3]
        names = ", ".join(f"{rel} ({s / 1e6:.0f} MB)" for rel, s in biggest)
        raise UserError(
            f"the code in {root} is {total / 1e6:.0f} MB, over the {limit_mb:g} MB limit for code (biggest: {names})",
            hint="ship data with --data PATH[:NAME], or list the files in .cholineignore",
        )
    raw = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,  # type: ignore[arg-type]
    ):
        for rel, path in files:
            info = tarfile.TarInfo(rel)
            st = path.stat()
            info.size = st.st_size
            info.mtime = FIXED_MTIME
            info.mode = 0o755 if st.st_mode & 0o111 else 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(path, "rb") as fh:
                tar.addfile(info, fh)
    data = raw.getvalue()
    return CodeBundle(data=data, digest=hashlib.sha256(data).hexdigest(), files=sizes)


# ---------------------------------------------------------------------------------------- environment
def _requirement_lines(path: Path, seen: set[Path] | None = None) -> list[str]:
    seen = seen or set()
    path = path.resolve()
    if path in seen:
        return []
    seen.add(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"cannot read requirements file {path}: {exc.strerror}") from None
    out: list[str] = []
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-r ", "--requirement ")):
            out += _requirement_lines(path.parent / line.split(None, 1)[1], seen)
            continue
        if line.startswith(("-e ", "--")):
            continue  # editable installs and pip options do not travel
        out.append(line)
    return out


def _pyproject_requirements(path: Path) -> list[str] | None:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    deps = data.get("project", {}).get("dependencies")
    return list(deps) if isinstance(deps, list) else None


def script_imports(script: Path, root: Path) -> set[str]:
    """Top-level modules imported by the script and by the local modules it imports (transitively)."""
    local = {p.stem for p in root.glob("*.py")} | {p.name for p in root.iterdir() if (p / "__init__.py").exists()}
    todo, seen, found = [script], set(), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        try:
            tree = ast.parse(path.read_text(), filename=str(path))
        except (OSError, SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module.split(".")[0]]
            for name in names:
                if name in local:
                    mod = root / f"{name}.py"
                    todo.append(mod if mod.exists() else root / name / "__init__.py")
                else:
                    found.add(name)
    return found


def _strip_local(version: str) -> str:
    return version.split("+", 1)[0]


def requirements_from_imports(modules: set[str]) -> list[str]:
    """Pin each imported third-party module to the version installed here (torch by a floor)."""
    import importlib.metadata as md

    stdlib = set(getattr(sys, "stdlib_module_names", ()))
    dists = md.packages_distributions()
    reqs: dict[str, str] = {}
    for mod in sorted(modules):
        if mod in stdlib or mod.startswith("_"):
            continue
        for dist in dists.get(mod, []):
            name = re.sub(r"[-_.]+", "-", dist).lower()
            if name in PROVIDED:
                continue
            try:
                version = _strip_local(md.version(dist))
            except md.PackageNotFoundError:
                continue
            if name in TORCH_FAMILY:
                major_minor = ".".join(version.split(".")[:2])
                reqs[name] = f"{name}>={major_minor}"  # any installed torch of this series serves
            else:
                reqs[name] = f"{name}=={version}"
    return sorted(reqs.values())


def resolve_env(script: Path, root: Path, requirements: Path | None = None) -> EnvSpec:
    """The environment spec for ``script`` (see the module doc for the order of sources)."""
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if requirements is not None:
        reqs, source = _requirement_lines(requirements), "flag"
    else:
        reqs, source = [], ""
        for folder in dict.fromkeys([script.parent.resolve(), root.resolve()]):
            if (folder / "requirements.txt").is_file():
                reqs, source = _requirement_lines(folder / "requirements.txt"), "requirements.txt"
                break
            if (folder / "pyproject.toml").is_file():
                deps = _pyproject_requirements(folder / "pyproject.toml")
                if deps is not None:
                    reqs, source = deps, "pyproject"
                    break
        if not source:
            reqs, source = requirements_from_imports(script_imports(script, root)), "imports"
    reqs = [r for r in reqs if re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower() not in PROVIDED]
    return EnvSpec(python=py, requirements=sorted(dict.fromkeys(reqs)), source=source)
