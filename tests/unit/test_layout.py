"""The layout's promises: light packages stay light, every process has its entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("fastapi", "sqlalchemy", "sqlmodel", "torch", "starlette", "uvicorn")


def imported_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return {m.split(".")[0] for m in json.loads(out.stdout.splitlines()[-1])}


def test_core_and_agent_import_nothing_heavy() -> None:
    mods = imported_after(
        "import choline_core.events, choline_core.bus, choline_core.storage, choline_core.settings, "
        "choline_core.specs, choline_core.faults, choline_core.embedded, choline_agent.__main__"
    )
    assert not mods & set(HEAVY), mods & set(HEAVY)


def test_cli_and_library_import_nothing_of_the_servers() -> None:
    mods = imported_after("import choline, choline.cli.main; choline.cli.main.build_parser()")
    assert not mods & set(HEAVY), mods & set(HEAVY)


@pytest.mark.parametrize("service", ["api", "provisioner", "syncer", "monitor", "deploy"])
def test_service_entry_points(service: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", f"choline_{service}", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "--health-port" in out.stdout


def test_agent_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "choline_agent", "--check"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert json.loads(out.stdout)["ok"] is True
