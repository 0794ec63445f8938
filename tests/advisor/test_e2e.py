"""End to end on the embedded control plane (``choline up``) with the OpenAI-compatible test server
as its model: a real run of the digits example with a learning rate of 50 diverges -> the monitor
raises a finding -> the advisor's answer is stored -> the run's auto-pause policy pauses it -> its
box is released. Then ``choline advise`` on the paused run, and ``choline apply-fix --yes``."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..e2e.conftest import REPO, ControlPlane
from .llm_server import DEFAULT_ANSWER, LlmServer

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

WANDB_KEY = "e2eWandbKey0123456789abcdefABCDEF012345"
LLM_KEY = "sk-e2e-test-0123456789abcdefABCDEF"


@pytest.fixture(scope="module")
def llm() -> Iterator[LlmServer]:
    with LlmServer() as server:
        yield server


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory, llm: LlmServer) -> Iterator[ControlPlane]:
    cp = ControlPlane(tmp_path_factory.mktemp("cp-advisor"))
    with cp.running(
        CHOLINE_LOSS_TIMEOUT_S="5",
        CHOLINE_HEARTBEAT_S="1",
        CHOLINE_LLM_BASE_URL=llm.url,
        CHOLINE_LLM_MODEL="e2e-model",
        CHOLINE_LLM_API_KEY=LLM_KEY,
    ):
        yield cp


def show(cp: ControlPlane, run_id: str) -> dict[str, object]:
    out = cp.cli("show", run_id, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def wait_for(what: str, check, timeout: float = 180.0, every: float = 0.5):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def test_a_diverging_run_is_explained_and_paused_and_its_box_released(
    plane: ControlPlane, llm: LlmServer, tmp_path: Path
) -> None:
    project = tmp_path / "digits"
    shutil.copytree(REPO / "examples" / "digits", project, ignore=shutil.ignore_patterns("choline-runs", "__pycache__"))
    out = plane.cli(
        "run",
        "--detach",
        "--monitor-policy",
        "auto-pause",
        "--env",
        "CHOLINE_FAULTS=train.step=sleep:0.05",  # slow enough for the pause to land mid-run
        "--env",
        f"WANDB_API_KEY={WANDB_KEY}",
        "train.py",
        "--1xcpu",
        "--lr",
        "50",
        "--epochs",
        "20",
        cwd=project,
    )
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.strip().splitlines()[-1]
    from choline.client import CholineClient
    from choline_core.settings import CholineSettings

    os.environ["CHOLINE_HOME"] = str(plane.home)  # restored by the autouse choline_home fixture
    with CholineClient.from_settings(CholineSettings()) as api:
        assert api.monitor(run_id).policy == "auto-pause"
        # the finding
        findings = wait_for("a critical finding", lambda: [f for f in api.findings(run_id) if f.severity == "critical"])
        assert findings[0].detector in ("divergence", "nan"), findings
        # the pause, through the same path as a user's: pausing, then paused with the box released
        info = wait_for("the run paused", lambda: (r := api.get_run(run_id)).state.value == "paused" and r)
        assert info.attempts[0].end_reason == "paused"
        assert show(plane, run_id)["state"] == "paused"
        wait_for("no box left", lambda: not plane.live_boxes(), timeout=30)
        # the advisor's answer, stored with the finding
        answered = wait_for(
            "the advisor's answer",
            lambda: [a for a in api.advice(run_id, include_context=True) if a.status == "answered"],
            timeout=60,
        )
        advice = next(a for a in answered if a.finding_id == findings[0].id)
        assert advice.answer is not None and advice.answer.diagnosis == DEFAULT_ANSWER["diagnosis"]
        assert advice.context is not None and advice.context_tokens is not None and advice.context_tokens <= 6000
        assert next(f for f in api.findings(run_id) if f.id == findings[0].id).advice["status"] == "answered"  # type: ignore[index]
    # what the model was sent: the finding, the run's command, the digits script; no secret
    sent = [r for r in llm.requests if run_id in r.user]
    assert sent, "the model was never asked about the run"
    prompt = next(r.user for r in sent if findings[0].message[:40] in r.user)
    assert "command: python train.py --lr 50 --epochs 20" in prompt
    assert 'ap.add_argument("--lr"' in prompt and "train/loss:" in prompt
    assert "WANDB_API_KEY=***" in prompt
    for r in llm.requests:
        assert WANDB_KEY not in r.text.replace(r.headers.get("authorization", ""), "")
        assert LLM_KEY not in json.dumps(r.body)
    logs = ""
    for path in (plane.home / "logs").glob("*.log"):
        logs += path.read_text(errors="replace")
    assert LLM_KEY not in logs and "auto-pause of " + run_id in logs

    # the run's monitor settings from the CLI: shown, merged, a bad one refused
    out = plane.cli("monitor", run_id)
    assert out.returncode == 0 and "policy     auto-pause (set for this run)" in out.stdout, out.stderr
    assert plane.cli("monitor", run_id, "divergence.k=6").returncode == 0
    out = plane.cli("monitor", "set", run_id, "stall.min_seconds=600", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["overrides"] == {"divergence": {"k": 6}, "stall": {"min_seconds": 600}}
    bad = plane.cli("monitor", run_id, "divergence.kk=6")
    assert bad.returncode == 1 and "bad monitor setting divergence.kk" in bad.stderr

    # on demand, for the paused run
    llm.script({**DEFAULT_ANSWER, "diagnosis": "Paused after diverging; rerun with --lr 0.003."})
    out = plane.cli("advise", run_id, "what should I try next?", "--json")
    assert out.returncode == 0, out.stderr
    asked = json.loads(out.stdout)
    assert asked["status"] == "answered" and asked["answer"]["diagnosis"].startswith("Paused after diverging")
    assert "The user asks: what should I try next?" in llm.requests[-1].user

    # apply the proposed fix as a new run: the changes shown, confirmed with --yes
    refused = plane.cli("apply-fix", run_id)  # no terminal, no --yes: nothing happens
    assert refused.returncode == 2 and "--yes" in refused.stderr
    out = plane.cli("apply-fix", run_id, "--yes", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "--lr  50  ->  0.003" in out.stderr and "+ choline run train.py --1xcpu --lr 0.003" in out.stderr
    new = json.loads(out.stdout)
    assert new["spec"]["args"] == ["--lr", "0.003", "--epochs", "20"] and new["run_id"] != run_id
    with CholineClient.from_settings(CholineSettings()) as api:
        assert api.monitor(new["run_id"]).policy == "auto-pause"  # the policy goes with the fix
        for rid in (new["run_id"], run_id):
            api.cancel(rid)
        wait_for("the fixed run cancelled", lambda: api.get_run(new["run_id"]).state.value == "cancelled", timeout=120)
    wait_for("no box left", lambda: not plane.live_boxes(), timeout=60)
