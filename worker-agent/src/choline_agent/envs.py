"""The script's Python environment: a virtualenv per resolved spec, shared by every run on the box.

``<envs_dir>/<digest[:16]>/`` is created once per ``EnvSpec`` digest and reused by later runs. It is
layered on the base interpreter: a ``.pth`` file puts the base's site-packages after the venv's own, so
pip sees (and keeps) what the base already has. A GPU image's torch that satisfies the requirements is
therefore used as it is instead of being downloaded again; a requirement the base does not satisfy is
installed into the venv, where it wins. A finished venv carries ``.choline-ready``; a half-built one is
rebuilt. Two agents on one box building the same spec take turns (``flock``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from choline_core.pipeline import EnvSpec

READY = ".choline-ready"
INFO = ".choline-env.json"
PTH = "_choline_base.pth"
INSTALL_TIMEOUT_S = 3600

_PROBE = r"""
import importlib.metadata as m, json, os, sys
out = {"python": "%d.%d.%d" % sys.version_info[:3], "prefix": sys.prefix, "torch": None, "torch_path": None}
try:
    d = m.distribution("torch")
    out["torch"] = d.version
    out["torch_path"] = os.path.realpath(str(d.locate_file("")))
except m.PackageNotFoundError:
    pass
print(json.dumps(out))
"""

_SITE_PATHS = (
    "import json, sys; print(json.dumps([p for p in sys.path if p.endswith(('site-packages', 'dist-packages'))]))"
)


class EnvError(Exception):
    """Building the environment failed; ``log_tail`` is the end of the install log."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.log_tail = log_tail


@dataclass
class Interpreter:
    python: str  # the executable the script runs with
    venv: Path | None
    version: str
    torch: str | None
    torch_source: str  # base | env | none
    reused: bool
    seconds: float


def tail(path: Path, lines: int = 30, chars: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])[-chars:]


def probe(python: str) -> dict[str, str | None]:
    out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise EnvError(f"the interpreter {python} does not run: {out.stderr.strip()[-500:]}")
    info: dict[str, str | None] = json.loads(out.stdout)
    return info


def describe(python: str, venv: Path | None, reused: bool, seconds: float) -> Interpreter:
    info = probe(python)
    torch_path = info.get("torch_path")
    source = "none"
    if info.get("torch"):
        inside = venv is not None and torch_path is not None and torch_path.startswith(str(venv.resolve()))
        source = "env" if inside else "base"
    return Interpreter(
        python=python,
        venv=venv,
        version=str(info.get("python")),
        torch=info.get("torch"),
        torch_source=source,
        reused=reused,
        seconds=seconds,
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _run(cmd: list[str], log: Path, env: dict[str, str], timeout: float) -> int:
    with open(log, "ab") as fh:
        fh.write(("$ " + " ".join(cmd) + "\n").encode())
        fh.flush()
        try:
            return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            fh.write(f"\n(timed out after {timeout:g}s)\n".encode())
            return 124


def venv_python(venv: Path) -> str:
    return str(venv / "bin" / "python")


def build(
    spec: EnvSpec,
    digest: str,
    envs_dir: Path,
    base_python: str,
    install_log: Path,
    env: dict[str, str] | None = None,
) -> Interpreter:
    """The interpreter for ``spec``: the venv of its digest, built now unless an earlier run built it."""
    t0 = time.monotonic()
    venv = envs_dir / digest[:16]
    env = dict(env if env is not None else os.environ)
    env.pop("PYTHONPATH", None)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    with _locked(envs_dir / f".{digest[:16]}.lock"):
        if (venv / READY).exists():
            return describe(venv_python(venv), venv, True, time.monotonic() - t0)
        shutil.rmtree(venv, ignore_errors=True)
        install_log.parent.mkdir(parents=True, exist_ok=True)
        if _run([base_python, "-m", "venv", "--without-pip", str(venv)], install_log, env, 300) != 0:
            raise EnvError(f"creating a virtualenv with {base_python} failed", tail(install_log))
        py = venv_python(venv)
        try:
            base_sites = json.loads(
                subprocess.run([base_python, "-c", _SITE_PATHS], capture_output=True, text=True, check=True).stdout
            )
            purelib = subprocess.run(
                [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        except (subprocess.CalledProcessError, ValueError) as exc:
            raise EnvError(f"cannot read the base interpreter's packages: {exc}", tail(install_log)) from None
        Path(purelib).mkdir(parents=True, exist_ok=True)
        # ``addsitedir`` (not bare path lines) so that the base's own .pth files (editable installs) count too
        sites = tuple(p for p in base_sites if p != purelib)
        (Path(purelib) / PTH).write_text(f"import site; list(map(site.addsitedir, {sites!r}))\n")
        if spec.requirements:
            if _run([py, "-m", "pip", "--version"], install_log, env, 120) != 0 and (
                _run([py, "-m", "ensurepip", "--default-pip"], install_log, env, 300) != 0
            ):
                raise EnvError("pip is not available for the base interpreter", tail(install_log))
            reqs = venv / "requirements.txt"
            reqs.write_text("".join(f"{r}\n" for r in spec.requirements))
            cmd = [py, "-m", "pip", "install", "--no-input", *spec.pip_args, "-r", str(reqs)]
            code = _run(cmd, install_log, env, INSTALL_TIMEOUT_S)
            if code != 0:
                raise EnvError(
                    f"installing the requirements failed (pip exited with {code})",
                    tail(install_log),
                )
        info = describe(py, venv, False, time.monotonic() - t0)
        (venv / INFO).write_text(
            json.dumps(
                {
                    "digest": digest,
                    "spec": spec.model_dump(mode="json"),
                    "base_python": base_python,
                    "python": info.version,
                    "torch": info.torch,
                    "torch_source": info.torch_source,
                    "built": time.time(),
                },
                indent=1,
            )
        )
        (venv / READY).write_text(str(time.time()))
        return info


def default_python() -> str:
    return sys.executable
