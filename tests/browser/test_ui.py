"""The web front end in a real Chromium against a real control plane (``choline up``): log in with a
token, the pages, webhooks and tokens managed from the browser, and a live run watched and
controlled: the chart grows, pause (the box goes), resume (an attempt boundary on the chart and in
the logs), a new learning rate (a mark on the chart), the gateway restarted under the page (the
streams come back with new stream tokens), more epochs, zoom, stop; then the model card
of the bundle it produced, read in the browser.

The tests of this module share one control plane and one tab, and run in order. Screenshots go to
tests/artifacts/browser/ (named in each test's output)."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from .conftest import Gateway, Tab, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.e2e]

TERMINAL = ("succeeded", "failed", "cancelled")
state: dict[str, Any] = {}  # what the live-run test leaves for the model-card test


def login(tab: Tab, token: str) -> None:
    tab.page.fill("#token", token)
    tab.page.click("#login")


def confirm(tab: Tab, shot: str | None = None) -> None:
    dialog = tab.page.locator("dialog#confirm[open]")
    dialog.wait_for()
    if shot:
        tab.shot(shot)
    tab.page.click("#confirm-ok")
    dialog.wait_for(state="hidden")


def chart_attr(tab: Tab, key: str, attr: str) -> str:
    return tab.page.locator(f'.chart[data-key="{key}"]').get_attribute(f"data-{attr}") or ""


def last_step(tab: Tab, key: str = "train/loss") -> int:
    value = chart_attr(tab, key, "last-step")
    return int(value) if value else -1


def run_state(tab: Tab) -> str:
    return tab.page.locator("main#main").get_attribute("data-state") or ""


def live_boxes(gw: Gateway, run_id: str) -> list[dict[str, Any]]:
    with gw.api() as api:
        boxes = api.get("/v1/boxes").json()["boxes"]
    return [b for b in boxes if b.get("run_id") == run_id]


# ------------------------------------------------------------------------------------------------
def test_login_and_the_pages(tab: Tab, cp: Gateway) -> None:
    tab.goto("/ui/runs")
    tab.page.wait_for_url("**/ui/login?next=*")  # no token yet: the login page, remembering where we were going
    login(tab, "chl_not-a-real-token")
    tab.page.wait_for_selector("#login-error:has-text('unknown or revoked')")
    tab.shot("login-refused")
    login(tab, cp.token)
    tab.page.wait_for_selector("#runs-table")
    assert tab.page.url.endswith("/ui/runs")
    assert "admin" in tab.page.inner_text("#who")
    assert "No runs match" in tab.page.inner_text("#runs-table")
    tab.shot("runs-empty")

    # models and deployments: none yet, and the pages say how to get one
    tab.page.click("#nav-models")
    tab.page.wait_for_selector("#models-table td.empty")
    assert "choline models push" in tab.page.inner_text("#models-table")
    tab.page.wait_for_selector("#bundles-table")
    tab.shot("models-empty")
    tab.page.click("#nav-deployments")
    tab.page.wait_for_selector("#deployments-table td.empty")
    assert "choline deploy model" in tab.page.inner_text("#deployments-table")
    tab.shot("deployments-empty")
    tab.check_clean()


class Receiver:
    """A webhook endpoint on a free loopback port that records what it is sent."""

    def __init__(self) -> None:
        self.got: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/choline"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_webhooks_and_tokens(tab: Tab, cp: Gateway, receiver: Receiver) -> None:
    # a webhook: added, its secret shown once, a test ping delivered (signed), removed
    tab.page.click("#nav-webhooks")
    tab.page.wait_for_selector("#webhooks-table")
    tab.page.fill("#wh-url", receiver.url)
    tab.page.fill("#wh-description", "browser test")
    tab.page.click("#wh-add")
    secret = tab.page.inner_text("#wh-secret", timeout=10_000)
    assert secret.startswith("whsec_")
    row = tab.page.locator("#webhooks-table tr[data-webhook]")
    row.first.wait_for(timeout=10_000)  # the table is drawn again once the webhook is stored
    assert row.count() == 1
    hook_id = row.get_attribute("data-webhook")
    row.locator("button:has-text('test')").click()
    wait_for(lambda: receiver.got, 20, "the test ping")
    headers, body = receiver.got[0]
    ts = headers["x-choline-timestamp"]
    expected = hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    assert headers["x-choline-signature"] == f"v1={expected}"
    row.locator("button:has-text('deliveries')").click()
    tab.page.wait_for_selector("#deliveries-table .dl-delivered", timeout=15_000)
    tab.shot("webhooks")
    row.locator("button:has-text('remove')").click()
    confirm(tab)
    tab.page.wait_for_selector("#webhooks-table td.empty")
    with cp.api() as api:
        assert all(h["id"] != hook_id for h in api.get("/v1/webhooks").json())

    # a token: created (shown once, and it works), then revoked after a confirmation
    tab.page.click("#nav-tokens")
    tab.page.wait_for_selector("#tokens-table")
    tab.page.fill("#tok-name", "from-the-browser")
    tab.page.click("#tok-create")
    token = tab.page.inner_text("#new-token", timeout=10_000)
    assert token.startswith("chl_")
    with cp.api() as api:
        me = api.get("/v1/me", headers={"Authorization": f"Bearer {token}"}).json()
    assert me["token_name"] == "from-the-browser"
    tab.shot("tokens")
    tab.page.locator("#tokens-table tr", has_text="from-the-browser").locator("button:has-text('revoke')").click()
    confirm(tab)
    wait_for(lambda: "from-the-browser" not in tab.page.inner_text("#tokens-table"), 10, "the token to go")
    with cp.api() as api:
        assert api.get("/v1/me", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    tab.check_clean()


@pytest.mark.timeout(420)
def test_a_live_run_watched_paused_resumed_and_retuned(tab: Tab, cp: Gateway, digits_project: Path) -> None:
    out = cp.cp.cli(
        "run",
        "--detach",
        "--name",
        "digits-in-the-browser",
        "--env",
        "CHOLINE_FAULTS=train.step=sleep:0.02",  # ~40 steps a second: slow enough to watch
        "train.py",
        "--1xcpu",
        "--epochs",
        "300",
        "--checkpoint-every",
        "25",
        "--scheduler",
        "step",
        cwd=digits_project,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    run_id = out.stdout.strip().splitlines()[-1]
    state["run_id"] = run_id

    # the run in the list, then its page
    tab.page.click("#nav-runs")
    tab.page.wait_for_selector(f'#runs-table tr[data-run="{run_id}"]')
    tab.page.click(f'#runs-table tr[data-run="{run_id}"] a.run-link')
    tab.page.wait_for_url(f"**/ui/runs/{run_id}")

    # the chart grows while we watch (points over the metrics stream)
    tab.page.wait_for_selector('.chart[data-key="train/loss"]', timeout=120_000)
    wait_for(lambda: last_step(tab) > 0, 60, "the first train/loss points")
    first = last_step(tab)
    wait_for(lambda: last_step(tab) >= first + 40, 60, "the chart to grow")
    assert run_state(tab) == "running"
    assert tab.page.locator("#logs .line").count() > 0 and tab.page.inner_text("#logs-state") == "live"
    # downsampled to the plot's width, never the whole history
    width = tab.page.locator('.chart[data-key="train/loss"] .plot').bounding_box()["width"]
    assert 0 < int(chart_attr(tab, "train/loss", "points")) <= 3 * width + 100
    tab.shot("run-live")

    # pause: the run checkpoints, pauses, and its box is gone
    tab.page.click("#pause")
    confirm(tab, "run-confirm-pause")
    wait_for(lambda: run_state(tab) == "paused", 90, "the run to pause")
    wait_for(lambda: not live_boxes(cp, run_id), 30, "the box to be released")
    assert not cp.cp.live_boxes()
    assert tab.page.locator("#resume").is_enabled() and tab.page.locator("#pause").is_disabled()
    paused_at = last_step(tab)
    tab.shot("run-paused")

    # resume: a second attempt from the checkpoint; its boundary is on the chart and in the logs
    tab.page.click("#resume")
    confirm(tab)
    tab.page.wait_for_selector('#attempts-table tr[data-attempt="2"]', timeout=60_000)
    wait_for(lambda: run_state(tab) == "running", 90, "the run to run again")
    wait_for(lambda: "attempt:" in chart_attr(tab, "train/loss", "marks"), 60, "the attempt boundary on the chart")
    tab.page.wait_for_selector('#logs .attempt-sep[data-attempt="2"]', timeout=60_000)
    wait_for(lambda: last_step(tab) > paused_at + 20, 90, "the chart to grow after the resume")
    with cp.api() as api:
        attempts = api.get(f"/v1/runs/{run_id}/attempts").json()["attempts"]
    resumed = attempts[1]["resumed_from_step"]
    assert 0 < resumed <= paused_at
    assert f"attempt:{resumed}" in chart_attr(tab, "train/loss", "marks")

    # a new learning rate: confirmed, applied by the training library, marked on every chart
    tab.page.fill("#lr-input", "0.0005")
    tab.page.click("#set-lr")
    confirm(tab, "run-confirm-lr")
    tab.page.wait_for_selector('#marks li[data-kind="lr"]', timeout=60_000)
    lr_step = int(tab.page.locator('#marks li[data-kind="lr"]').first.get_attribute("data-step") or -1)
    assert lr_step > resumed
    wait_for(lambda: f"lr:{lr_step}" in chart_attr(tab, "train/loss", "marks"), 20, "the LR mark on the loss chart")
    wait_for(lambda: f"lr:{lr_step}" in chart_attr(tab, "lr", "marks"), 20, "the LR mark on the lr chart")
    # and the lr series itself has the new value from the next step on (the mark is where it was applied)
    with cp.api() as api:
        pts = api.get(f"/v1/runs/{run_id}/metrics", params={"key": "lr", "after_step": lr_step}).json()["points"]
    assert pts and pts[0]["step"] == lr_step + 1 and abs(pts[0]["value"] - 0.0005) < 1e-9
    tab.shot("run-lr-mark")

    # the gateway restarts under the page, after its stream tokens expired (15 s here): the page gets
    # new ones and both streams go on where they stopped
    cp.restart_api()
    before = last_step(tab)
    wait_for(lambda: last_step(tab) > before + 20, 90, "the chart to grow after the gateway restarted")

    # more epochs (the command's log lines arrive over the renewed log stream)
    tab.page.fill("#epochs-input", "3")
    tab.page.click("#extend")
    confirm(tab)
    tab.page.wait_for_selector('#marks li[data-kind="epochs"]', timeout=60_000)
    assert "epochs 303" in tab.page.inner_text('#marks li[data-kind="epochs"]')
    tab.page.wait_for_selector('#logs .line:has-text(\'control: set {"epochs": "+3"}\')', timeout=30_000)
    assert tab.page.inner_text("#logs-state") == "live"

    # zoom: drag across the loss chart, the range is fetched again; double-click goes back
    over = tab.page.locator('.chart[data-key="train/loss"] .u-over')
    box = over.bounding_box()
    y = box["y"] + box["height"] / 2
    tab.page.mouse.move(box["x"] + box["width"] * 0.1, y)
    tab.page.mouse.down()
    tab.page.mouse.move(box["x"] + box["width"] * 0.4, y, steps=8)
    tab.page.mouse.up()
    wait_for(lambda: chart_attr(tab, "train/loss", "zoomed") == "1", 10, "the zoom")
    tab.shot("run-zoomed")
    over.dblclick()
    wait_for(lambda: chart_attr(tab, "train/loss", "zoomed") == "", 10, "the zoom reset")

    # stop: a final checkpoint, the results come back, no box left
    tab.page.click("#stop")
    confirm(tab)
    wait_for(lambda: run_state(tab) in TERMINAL, 120, "the run to end")
    wait_for(lambda: not live_boxes(cp, run_id), 30, "no box left")
    tab.page.wait_for_selector("#bundle a", timeout=30_000)
    tab.page.wait_for_selector("#logs-state:has-text('ended')", timeout=30_000)
    tab.page.wait_for_selector("#checkpoints-table td.num")
    tab.shot("run-stopped")
    tab.check_clean()


def test_the_model_card_of_the_run_s_bundle(tab: Tab, cp: Gateway, tmp_path: Path) -> None:
    run_id = state.get("run_id")
    if not run_id:
        pytest.fail("the live-run test left no run with a bundle")
    with cp.api() as api:
        bundle = api.get(f"/v1/runs/{run_id}/artifacts").json()["bundle"]
        wait_for(lambda: api.get("/v1/models").json()["models"], 30, "the run's bundle registered as a model")
        (model,) = api.get("/v1/models").json()["models"]
    assert model["run_id"] == run_id and model["version"] == 1
    name = model["name"]
    local = tmp_path / bundle["path"]
    with urllib.request.urlopen(bundle["url"], timeout=30) as resp:  # a presigned URL of the control plane's S3
        local.write_bytes(resp.read())

    # the registry lists it; its card opens from the list
    tab.page.click("#nav-models")
    tab.page.wait_for_selector(f'#models-table tr[data-model="{name}"]')
    assert run_id in tab.page.inner_text(f'#models-table tr[data-model="{name}"]')
    tab.page.wait_for_selector(f'#bundles-table a[href="/ui/runs/{run_id}"]')
    tab.page.click(f'#models-table tr[data-model="{name}"] a.model-link')
    tab.page.wait_for_selector("#model-detail #model-card")
    assert "Recognise a handwritten digit" in tab.page.inner_text("#card-purpose")
    tab.shot("models-registry")

    # a bundle file read in the browser gives the same card
    tab.page.click("#nav-deployments")
    tab.page.click("#nav-models")
    tab.page.wait_for_selector(f'#models-table tr[data-model="{name}"]')
    tab.page.set_input_files("#bundle-file", str(local))
    tab.page.wait_for_selector("#model-card")
    assert "Recognise a handwritten digit" in tab.page.inner_text("#card-purpose")
    inputs = tab.page.inner_text("#card-inputs")
    assert "pixels" in inputs and "float32" in inputs and "[64]" in inputs
    assert "normalize" in tab.page.inner_text("#card-preprocessing")
    assert "sklearn digits" in tab.page.inner_text("#card-data")
    assert "val/accuracy" in tab.page.inner_text("#card-metrics")

    # the try-it form generated from the input schema checks what it is given
    tab.page.fill("#in-pixels", "1 2 3")
    tab.page.click("#try-send")
    tab.page.wait_for_selector("#try-problems li:has-text('the model takes 64')")
    tab.page.fill("#in-pixels", ", ".join(["17"] + ["0"] * 63))
    tab.page.click("#try-send")
    tab.page.wait_for_selector("#try-problems li:has-text('outside 0 .. 16')")
    pixels = [i % 17 for i in range(64)]
    tab.page.fill("#in-pixels", ", ".join(map(str, pixels)))
    tab.page.click("#try-send")
    tab.page.wait_for_selector("#try-body:not([hidden])")
    body = json.loads(tab.page.inner_text("#try-body"))
    assert body == {"pixels": pixels}  # what POST .../predict takes
    tab.shot("models-card")

    # deployed (a local replica): the deployments page sends the form to the real endpoint
    out = cp.cp.cli("deploy", "model", name, "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    try:
        with cp.api() as api:
            want = api.post(f"/v1/deployments/{name}/predict", json={"pixels": pixels})
        assert want.status_code == 200, want.text
        tab.page.click("#nav-deployments")
        tab.page.wait_for_selector(f'#deployments-table tr[data-deployment="{name}"]')
        assert "ready" in tab.page.inner_text(f'#deployments-table tr[data-deployment="{name}"]')
        tab.page.click(f'#deployments-table tr[data-deployment="{name}"] a.deployment-link')
        tab.page.wait_for_selector("#deployment-detail #model-card")
        tab.page.fill("#in-pixels", ", ".join(map(str, pixels)))
        tab.page.click("#try-send")
        wait_for(lambda: tab.page.inner_text("#try-result").startswith("{"), 30, "the prediction")
        assert json.loads(tab.page.inner_text("#try-result")) == want.json()
        tab.shot("deployments-try-it")
    finally:
        assert cp.cp.cli("undeploy", name).returncode == 0
    tab.check_clean()
