"""From a trained model to an endpoint on the embedded control plane (``choline up``), driven through the CLI
as a user would: a successful run registers its bundle as a model; ``choline deploy model`` serves it;
``choline predict`` through the gateway equals the bundle in process; a killed serving process comes back;
a pushed version and a rollback switch under load without a failed request; undeploy leaves nothing."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import choline
from choline_deploy.local import pid_alive

from ..e2e.conftest import REPO, ControlPlane
from ..serve.conftest import digits_bundle  # noqa: F401  (session fixture: a bundle made elsewhere)

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

PIXELS = [float((i * 5) % 17) for i in range(64)]


UP_ENV = {"CHOLINE_DEPLOY_CHECK_INTERVAL_S": "0.5", "CHOLINE_DEPLOY_SWITCH_GRACE_S": "1.5"}


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("deploy-cp"))
    with plane.running(**UP_ENV):
        yield plane


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A webhook endpoint on a free loopback port: the JSON bodies it was sent."""
    got: list[dict[str, Any]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", got
    server.shutdown()
    server.server_close()


def cli_json(cp: ControlPlane, *args: str) -> Any:
    out = cp.cli(*args, "--json") if args[0] != "predict" else cp.cli(*args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_for(check: Any, timeout: float = 60, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.3)


def test_run_to_endpoint_and_back(
    cp: ControlPlane,
    tmp_path: Path,
    digits_bundle: Path,  # noqa: F811
    receiver: tuple[str, list[dict[str, Any]]],
) -> None:
    project = tmp_path / "digits"
    shutil.copytree(REPO / "examples" / "digits", project, ignore=shutil.ignore_patterns("choline-runs", "__pycache__"))
    run = cp.cli("train.py", "--1xcpu", "--epochs", "2", cwd=project)
    assert run.returncode == 0, run.stderr[-3000:]
    run_id = next(line.split("run ", 1)[1].split()[0] for line in run.stderr.splitlines() if " queued on " in line)

    # the successful run's bundle is model digits:1
    def registered() -> Any:
        found = [m for m in cli_json(cp, "models", "ls") if m["name"] == "digits"]
        return found or None

    (model,) = wait_for(registered, what="the run's bundle registered")
    assert model["version"] == 1 and model["source"] == "run" and model["run_id"] == run_id
    shown = cli_json(cp, "models", "show", "digits")
    assert shown["card"]["purpose"].startswith("Recognise a handwritten digit")
    assert shown["card"]["training"]["run_id"] == run_id
    human = cp.cli("models", "show", "digits:1")
    assert "pixels: float32 [64] in [0, 16]" in human.stdout and "labels: 0, 1, 2" in human.stdout

    # deploy -> one URL through the gateway, the direct one too; the owner's webhook hears it is ready
    hook_url, delivered = receiver
    assert cp.cli("webhooks", "add", hook_url, "--events", "deployment.ready").returncode == 0
    deployed = cli_json(cp, "deploy", "model", "digits", "--max-wait-ms", "0")
    assert deployed["state"] == "ready" and deployed["version"] == 1
    assert deployed["url"].endswith("/v1/deployments/digits/predict") and deployed["direct"]
    (replica,) = deployed["replicas"]

    bundle = choline.load_bundle(next((project / "choline-runs" / run_id).glob("*.choline-bundle.tar.gz")))
    want = bundle.predict(torch.tensor([PIXELS]))[0]
    got = cli_json(cp, "predict", "digits", "--json", json.dumps({"pixels": PIXELS}))["digit"]
    assert torch.equal(torch.tensor(got["value"], dtype=torch.float32), want)
    assert got["label"] == str(int(want.argmax()))
    ready = wait_for(lambda: [d for d in delivered if d["type"] == "deployment.ready"], what="the webhook")
    assert ready[0]["data"]["name"] == "digits" and ready[0]["data"]["version"] == "1"
    assert ready[0]["data"]["url"] == replica["url"]
    bad = cp.cli("predict", "digits", "--json", '{"pixels": [1, 2, 3]}')
    assert bad.returncode == 1 and "pixels: expected shape [64], got [3]" in bad.stderr

    # a killed serving process is started again; the gateway's URL keeps answering
    os.kill(replica["pid"], 9)
    wait_for(
        lambda: (
            cli_json(cp, "deployments", "ls")[0]["replicas"][0]["restarts"] == 1
            and cli_json(cp, "deployments", "ls")[0]["state"] == "ready"
        ),
        what="the replica restarted",
    )
    got = cli_json(cp, "predict", "digits", "--json", json.dumps({"pixels": PIXELS}))["digit"]
    assert torch.equal(torch.tensor(got["value"], dtype=torch.float32), want)

    # a bundle made elsewhere is version 2; deploy it, then roll back, while clients keep asking
    pushed = cli_json(cp, "models", "push", str(digits_bundle))
    assert pushed["name"] == "digits" and pushed["version"] == 2 and pushed["source"] == "push"
    want2 = choline.load_bundle(digits_bundle).predict(torch.tensor([PIXELS]))[0]
    from choline.client import CholineClient
    from choline_core.settings import CholineSettings

    os.environ["CHOLINE_HOME"] = str(cp.home)  # restored by the autouse choline_home fixture
    answers: list[int] = []
    failures: list[str] = []
    strays: list[list[float]] = []
    stop = threading.Event()
    # a sample batched with other clients' sums in another order than alone: a float32 hair apart, while
    # the two versions are far apart
    assert not torch.allclose(want, want2, rtol=0, atol=1e-2)

    def client() -> None:
        with CholineClient.from_settings(CholineSettings()) as api:
            while not stop.is_set():
                try:
                    value = torch.tensor(api.predict("digits", {"pixels": PIXELS})["digit"]["value"])
                except Exception as exc:
                    failures.append(repr(exc))
                    continue
                close = [v for v, w in ((1, want), (2, want2)) if torch.allclose(value, w, rtol=1e-4, atol=1e-4)]
                answers.append(close[0] if len(close) == 1 else -1)
                if len(close) != 1:
                    strays.append(value.tolist())

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        up2 = cli_json(cp, "deploy", "model", "digits")
        assert up2["version"] == 2 and up2["previous_version"] == 1
        wait_for(lambda: answers and answers[-1] == 2, what="answers of version 2")
        back = cp.cli("rollback", "digits")
        assert back.returncode == 0 and "digits:1 ready" in back.stdout, back.stderr
        wait_for(lambda: answers[-1] == 1, what="answers of version 1 again")
        n = len(answers)
        wait_for(lambda: len(answers) > n + 20, what="more answers")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert failures == [] and -1 not in answers, (strays[:3], want.tolist(), want2.tolist())
    assert 2 in answers and answers[-1] == 1

    # `choline down` stops the serving process with the control plane (no orphan holds a port); the next
    # `up` serves the deployment again
    wait_for(lambda: len(cli_json(cp, "deployments", "ls")[0]["replicas"]) == 1, what="the switch's old replica gone")
    (before,) = cli_json(cp, "deployments", "ls")[0]["replicas"]
    assert pid_alive(before["pid"])
    assert cp.cli("down", timeout=120).returncode == 0
    assert not pid_alive(before["pid"])
    up = cp.cli("up", timeout=120, **UP_ENV)
    assert up.returncode == 0, up.stderr
    wait_for(
        lambda: (
            (d := cli_json(cp, "deployments", "ls")[0])["state"] == "ready"
            and d["replicas"][0]["state"] == "ready"
            and d["replicas"][0]["pid"] != before["pid"]
        ),
        what="the deployment served again after up",
    )
    got = cli_json(cp, "predict", "digits", "--json", json.dumps({"pixels": PIXELS}))["digit"]
    assert torch.allclose(torch.tensor(got["value"], dtype=torch.float32), want, rtol=1e-4, atol=1e-4)

    # undeploy: no serving process left, nothing listed
    listed = cli_json(cp, "deployments", "ls")
    pids = [r["pid"] for d in listed for r in d["replicas"]]
    assert cp.cli("undeploy", "digits").returncode == 0
    assert cli_json(cp, "deployments", "ls") == []
    assert not any(pid_alive(p) for p in pids)
    assert not list((cp.home / "deploy" / "replicas").glob("*"))
    gone = cp.cli("predict", "digits", "--json", json.dumps({"pixels": PIXELS}))
    assert gone.returncode == 1 and "no deployment 'digits'" in gone.stderr
