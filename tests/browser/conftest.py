"""Fixtures for the browser tests: Debian's Chromium driven by Playwright, one real control plane
(``choline up`` in a CHOLINE_HOME of the module's own) and one logged-in tab per module.

- ``chromium``: a persistent Chromium context (a fresh user-data-dir) started from
  ``/usr/bin/chromium`` (never Playwright's own browser download, which cannot work here).
  ``make dev`` installs Chromium (apt-get) and Playwright (PyPI); where either is missing the
  browser tests are skipped with the command that installs them.
- ``cp``: the control plane, with its gateway URL and admin token.
- ``tab``: a :class:`Tab` (a Playwright page on the gateway, JS errors and CSP violations collected,
  screenshots into ``tests/artifacts/browser/``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import REPO, ControlPlane

CHROMIUM = os.environ.get("CHOLINE_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SHOTS = REPO / "tests" / "artifacts" / "browser"


@dataclass
class Gateway:
    cp: ControlPlane
    url: str
    token: str

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=10)

    def restart_api(self) -> None:
        """SIGTERM the api process this control plane's supervisor started; wait for its successor."""
        state = self.cp.home / "run" / "state.json"
        pid = json.loads(state.read_text())["components"]["api"]["pid"]
        os.kill(pid, signal.SIGTERM)

        def back() -> bool:
            now = json.loads(state.read_text())["components"]["api"]
            if now["pid"] in (None, pid):
                return False
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(back, 60, "the api to come back")


@dataclass
class Tab:
    page: Any
    gw: Gateway
    errors: list[str] = field(default_factory=list)

    def goto(self, path: str) -> None:
        self.page.goto(self.gw.url + path)

    def shot(self, name: str) -> Path:
        path = SHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path

    def check_clean(self) -> None:
        """No uncaught JS error and no CSP violation since the last check."""
        errors, self.errors[:] = list(self.errors), []
        assert not errors, errors


def wait_for(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"no Chromium at {CHROMIUM}: 'make dev' installs Debian's chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed: 'make dev' (requirements-dev.txt) installs it")
    SHOTS.mkdir(parents=True, exist_ok=True)
    print(f"\nbrowser screenshots go to {SHOTS}")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
            accept_downloads=False,
        )
        context.set_default_timeout(20_000)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    plane = ControlPlane(tmp_path_factory.mktemp("cp-home"))
    # stream tokens live 15 s here, so the live-run test sees the page renew them when the gateway restarts
    with plane.running(CHOLINE_LOSS_TIMEOUT_S="5", CHOLINE_HEARTBEAT_S="1", CHOLINE_API_STREAM_TOKEN_TTL="15"):
        url = json.loads((plane.home / "endpoints.json").read_text())["gateway_url"]
        token = json.loads((plane.home / "secrets" / "token.json").read_text())["api_token"]
        yield Gateway(plane, url, token)


@pytest.fixture(scope="module")
def tab(chromium: Any, cp: Gateway) -> Iterator[Tab]:
    page = chromium.new_page()
    tab = Tab(page, cp)
    page.on("pageerror", lambda exc: tab.errors.append(f"uncaught: {exc}"))

    def on_console(msg: Any) -> None:
        if msg.type == "error" and "Content Security Policy" in msg.text:
            tab.errors.append(f"CSP: {msg.text}")

    page.on("console", on_console)
    yield tab
    page.close()


@pytest.fixture
def digits_project(tmp_path: Path) -> Path:
    project = tmp_path / "digits"
    shutil.copytree(REPO / "examples" / "digits", project, ignore=shutil.ignore_patterns("choline-runs", "__pycache__"))
    return project
