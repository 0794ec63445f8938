"""Fault barriers: stop, crash or slow a process at a named point, for chaos tests.

Code marks exact moments with ``barrier("checkpoint.upload.midway")``. Nothing happens
unless ``CHOLINE_FAULTS`` names that barrier; with the variable unset, ``barrier()`` is one
dictionary lookup on an empty dict (free in production).

``CHOLINE_FAULTS`` is a comma-separated list of ``NAME=ACTION[@N]``:

==============  =============================================================================
``crash``       SIGKILL this process at once (no cleanup, like a machine dying)
``exit:CODE``   ``os._exit(CODE)``
``raise``       raise ``FaultInjected`` (the caller's error handling runs)
``sleep:SEC``   sleep SEC seconds, then continue
``pause``       block until released: writes ``<dir>/<name>.reached`` and waits for
                ``<dir>/<name>.release`` (``dir`` = ``CHOLINE_FAULTS_DIR``, default cwd)
==============  =============================================================================

``@N`` fires on the N-th time the barrier is reached (1-based), and only that once; without
it, every time. ``#K`` fires when the barrier is reached *at* K (code that passes ``at=``, such
as the training step: ``barrier("train.step", at=step)``), in whichever process gets there; a
pause at ``#K`` waits on ``<name>#K.release``. A name may appear several times.
Example: ``CHOLINE_FAULTS="provision.after_create=crash,train.step=pause#120,train.step=pause#260"``.

Tests use ``wait_reached()`` and ``release()`` from the other side.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

ENV = "CHOLINE_FAULTS"
DIR_ENV = "CHOLINE_FAULTS_DIR"


class FaultInjected(RuntimeError):
    """Raised by a barrier whose action is ``raise``."""


@dataclass
class _Fault:
    action: str
    arg: str | None
    nth: int | None
    at: int | None = None
    hits: int = 0


def _parse(spec: str) -> dict[str, list[_Fault]]:
    faults: dict[str, list[_Fault]] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        name, _, rest = item.partition("=")
        if not rest:
            raise ValueError(f"{ENV}: {item!r} is not NAME=ACTION")
        rest, _, at = rest.partition("#")
        rest, _, nth = rest.partition("@")
        action, _, arg = rest.partition(":")
        if action not in ("crash", "exit", "raise", "sleep", "pause"):
            raise ValueError(f"{ENV}: unknown action {action!r} in {item!r}")
        faults.setdefault(name.strip(), []).append(
            _Fault(action, arg or None, int(nth) if nth else None, int(at) if at else None)
        )
    return faults


_FAULTS: dict[str, list[_Fault]] = _parse(os.environ.get(ENV, ""))


def reload() -> None:
    """Re-read ``CHOLINE_FAULTS`` (for tests that set it in-process)."""
    global _FAULTS
    _FAULTS = _parse(os.environ.get(ENV, ""))


def _dir() -> Path:
    return Path(os.environ.get(DIR_ENV) or os.getcwd())


def _due(name: str, at: int | None) -> list[_Fault]:
    due = []
    for fault in _FAULTS.get(name, ()):
        if fault.at is not None:
            if at == fault.at:
                due.append(fault)
            continue
        fault.hits += 1
        if fault.nth is None or fault.hits == fault.nth:
            due.append(fault)
    return due


def barrier(name: str, at: int | None = None) -> None:
    """Mark a named moment (``at``: where, e.g. the step). Free unless ``CHOLINE_FAULTS`` names it."""
    if not _FAULTS or name not in _FAULTS:
        return
    for fault in _due(name, at):
        _fire(name if fault.at is None else f"{name}#{fault.at}", fault)


def _fire(name: str, fault: _Fault) -> None:
    if fault.action == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)  # never reached
    elif fault.action == "exit":
        os._exit(int(fault.arg or 1))
    elif fault.action == "raise":
        raise FaultInjected(f"fault injected at {name}")
    elif fault.action == "sleep":
        time.sleep(float(fault.arg or 1))
    elif fault.action == "pause":
        d = _dir()
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.reached").write_text(str(os.getpid()))
        release = d / f"{name}.release"
        while not release.exists():
            time.sleep(0.02)


async def abarrier(name: str, at: int | None = None) -> None:
    """``barrier`` for coroutines: a ``pause`` or ``sleep`` does not block the event loop."""
    if not _FAULTS or name not in _FAULTS:
        return
    import asyncio

    for fault in _due(name, at):
        label = name if fault.at is None else f"{name}#{fault.at}"
        if fault.action in ("pause", "sleep"):
            await asyncio.to_thread(_fire, label, fault)
        else:
            _fire(label, fault)


# ------------------------------------------------------------------ the test side
def wait_reached(name: str, directory: str | os.PathLike[str], timeout: float = 30.0) -> int:
    """Wait until a process paused at barrier ``name``; returns its pid."""
    path = Path(directory) / f"{name}.reached"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            text = path.read_text().strip()
            if text:
                return int(text)
        time.sleep(0.02)
    raise TimeoutError(f"barrier {name!r} not reached within {timeout:g}s")


def release(name: str, directory: str | os.PathLike[str]) -> None:
    (Path(directory) / f"{name}.release").write_text("go")


def arm(name: str, directory: str | os.PathLike[str]) -> None:
    """Make a released ``pause`` barrier hold again at its next pass (and forget it was reached)."""
    for suffix in (".reached", ".release"):
        (Path(directory) / f"{name}{suffix}").unlink(missing_ok=True)
