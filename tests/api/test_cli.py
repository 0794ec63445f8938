"""The CLI's API commands against a live gateway (the api service on the real bus, with stand-ins
for the provisioner and the syncer): exit codes, --json, one-line errors."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from choline.cli.main import main
from choline_api.main import DURABLE_LOGS, ApiService
from choline_core import pipeline, rpc
from choline_core.bus import Bus
from choline_core.embedded import free_port
from choline_core.events import ControlAction, ControlCommand, RunState
from choline_core.storage import S3Store

from .conftest import StandInProvisioner, StandInSyncer, base_url, eventually
from .test_logs_metrics import consumer_caught_up, publish_logs
from .test_runs import read_back


class Cli:
    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    async def __call__(self, *args: str) -> tuple[int, str, str]:
        """Run ``choline ARGS`` in a worker thread (the gateway runs on this test's loop)."""
        self.capsys.readouterr()
        rc = await asyncio.to_thread(main, list(args))
        out, err = self.capsys.readouterr()
        return rc, out, err

    async def json(self, *args: str) -> Any:
        rc, out, err = await self(*args, "--json")
        assert rc == 0, err
        return json.loads(out)


@pytest.fixture
def cli(api: ApiService, admin_token: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    """The CLI pointed at the test's gateway; the token comes from the file the api wrote."""
    monkeypatch.setenv("CHOLINE_GATEWAY_URL", base_url(api))
    return Cli(capsys)


async def queued(http: httpx.AsyncClient, provisioner: StandInProvisioner, **spec: Any) -> str:
    run_id = str((await http.post("/v1/runs", json={"script": "train.py", **spec})).json()["run_id"])
    await eventually(lambda: run_id in provisioner.runs)
    return run_id


async def test_ls_and_show(
    cli: Cli, http: httpx.AsyncClient, provisioner: StandInProvisioner, syncer: StandInSyncer
) -> None:
    assert (await cli("ls"))[1].startswith("no runs yet")
    first = await queued(http, provisioner, name="baseline")
    second = await queued(http, provisioner, name="bigger", gpus="2x3090")
    await provisioner.set_state(first, RunState.running)
    now = datetime.now(timezone.utc)
    provisioner.runs[first].attempts = [
        rpc.AttemptInfo(
            attempt=1, box_id="b1", host="h1", started_at=now, ended_at=now, end_reason="box lost", cost=0.2
        ),
        rpc.AttemptInfo(attempt=2, box_id="b2", host="h2", started_at=now, resumed_from_step=100, cost=0.1),
    ]
    provisioner.runs[first].cost = 0.3
    syncer.checkpoints[first] = [pipeline.CheckpointInfo(run_id=first, attempt=2, step=200, prefix="p", size=3 << 20)]

    runs = await cli.json("ls")
    assert [r["run_id"] for r in runs] == [second, first]
    assert [r["run_id"] for r in await cli.json("ls", "--state", "running")] == [first]
    rc, out, _ = await cli("ls")
    assert rc == 0 and out.splitlines()[0].split() == [
        "RUN",
        "NAME",
        "STATE",
        "GPUS",
        "PROVIDER",
        "ATTEMPTS",
        "COST",
        "CREATED",
    ]
    assert first in out and "bigger" in out and "2x3090" in out

    shown = await cli.json("show", first)
    assert shown["state"] == "running" and len(shown["attempts"]) == 2 and shown["checkpoints"][0]["step"] == 200
    rc, out, _ = await cli("show", first)
    assert rc == 0 and "box lost" in out and "3.0 MB" in out and "$0.3000" in out

    rc, out, err = await cli("show", "rnope000000")
    assert (rc, out) == (1, "") and err == "choline: error: no run rnope000000 (see 'choline ls')\n"


async def test_control_commands(cli: Cli, http: httpx.AsyncClient, bus: Bus, provisioner: StandInProvisioner) -> None:
    run_id = await queued(http, provisioner)
    await provisioner.set_state(run_id, RunState.running)
    for action in ("pause", "resume", "stop"):
        rc, out, _ = await cli(action, run_id)
        assert rc == 0 and run_id in out
    assert (await cli("set", run_id, "lr=3e-4", "epochs=+5", "warmup=100", "note=hi"))[0] == 0
    commands = [e.event(ControlCommand) for e in await read_back(bus, bus.subjects.run_control(run_id), n=4)]
    assert [c.action for c in commands] == [
        ControlAction.pause,
        ControlAction.resume,
        ControlAction.stop,
        ControlAction.set,
    ]
    assert commands[-1].params == {"lr": 3e-4, "epochs": "+5", "warmup": 100, "note": "hi"}

    rc, _, err = await cli("set", run_id, "lr")
    assert rc == 2 and err.count("\n") == 1 and "KEY=VALUE" in err
    await provisioner.set_state(run_id, RunState.cancelled)
    rc, _, err = await cli("pause", run_id)
    assert rc == 1 and "already cancelled" in err


async def test_logs_and_follow(cli: Cli, http: httpx.AsyncClient, bus: Bus, provisioner: StandInProvisioner) -> None:
    run_id = await queued(http, provisioner)
    await publish_logs(bus, run_id, 1, range(4))  # seq 4 goes to stderr (see publish_logs)
    await eventually(lambda: consumer_caught_up(bus, DURABLE_LOGS, "LOGS"))
    rc, out, err = await cli("logs", run_id)
    assert rc == 0 and out == "line 0\nline 1\nline 2\nline 3\n"

    follower = asyncio.create_task(cli("logs", run_id, "-f"))
    await asyncio.sleep(0.5)
    await publish_logs(bus, run_id, 1, range(4, 6))
    await publish_logs(bus, run_id, 2, range(2), fmt="again {}")
    await asyncio.sleep(0.3)
    await provisioner.set_state(run_id, RunState.failed, reason="exit code 3")
    rc, out, err = await asyncio.wait_for(follower, 20)
    assert rc == 0
    assert out == "line 0\nline 1\nline 2\nline 3\nline 5\nagain 0\nagain 1\n"
    assert "line 4" in err and "--- attempt 2 ---" in err and err.endswith(f"run {run_id} failed\n")


async def test_wait_exits_0_only_when_the_run_succeeded(
    cli: Cli, http: httpx.AsyncClient, provisioner: StandInProvisioner
) -> None:
    good, bad, slow = [await queued(http, provisioner) for _ in range(3)]
    await provisioner.set_state(good, RunState.succeeded)
    await provisioner.set_state(bad, RunState.failed, reason="exit code 1")
    assert (await cli("wait", good)) == (0, f"{good} succeeded\n", "")
    assert (await cli("wait", bad))[:2] == (1, f"{bad} failed (exit code 1)\n")
    rc, _, err = await cli("wait", slow, "--timeout", "0.5")
    assert rc == 1 and "still provisioning" in err
    waiter = asyncio.create_task(cli("wait", slow, "-q"))
    await asyncio.sleep(0.5)
    await provisioner.set_state(slow, RunState.succeeded)
    assert await asyncio.wait_for(waiter, 10) == (0, "", "")


async def test_pull_downloads_artifacts_and_the_bundle(
    cli: Cli,
    http: httpx.AsyncClient,
    provisioner: StandInProvisioner,
    syncer: StandInSyncer,
    store: S3Store,
    tmp_path: Path,
) -> None:
    run_id = await queued(http, provisioner)
    files = {
        "out/metrics.json": b'{"acc": 0.97}',
        "predictions.csv": b"id,y\n1,0\n" * 1000,
        "digits.tar.gz": b"a bundle",
    }
    listed = []
    for name, data in files.items():
        key = f"runs/{run_id}/artifacts/{name}"
        store.put_bytes(key, data)
        listed.append(
            pipeline.ArtifactInfo(
                path=name, key=key, size=len(data), sha256=_sha(data), attempt=1, url=store.presign_get(key)
            )
        )
    syncer.artifacts[run_id] = pipeline.ArtifactList(run_id=run_id, artifacts=listed, bundle="digits.tar.gz")
    dest = tmp_path / "pulled"
    rc, out, err = await cli("pull", run_id, "--dest", str(dest))
    assert rc == 0, err
    assert "pulled 3 file(s)" in out
    for name, data in files.items():
        assert (dest / name).read_bytes() == data
    rc, out, _ = await cli("pull", run_id, "--dest", str(dest))
    assert rc == 0 and "pulled 0 file(s)" in out and "3 already here" in out

    # the default folder is ./choline-runs/<run>/
    os.chdir(tmp_path)
    assert (await cli("pull", run_id))[0] == 0
    assert (tmp_path / "choline-runs" / run_id / "out" / "metrics.json").exists()

    # a listing that points outside the destination is refused, and nothing is written there
    evil = listed[0].model_copy(update={"path": "../escape.txt"})
    syncer.artifacts[run_id] = pipeline.ArtifactList(run_id=run_id, artifacts=[evil])
    rc, _, err = await cli("pull", run_id, "--dest", str(dest))
    assert rc == 1 and "refusing" in err and not (tmp_path / "escape.txt").exists()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_boxes_and_offers(cli: Cli, provisioner: StandInProvisioner) -> None:
    provisioner.boxes = [{"box_id": "b1", "owner": "admin", "provider": "local", "state": "ready", "run_id": "r1"}]
    assert await cli.json("boxes", "ls") == provisioner.boxes
    rc, out, _ = await cli("boxes", "ls")
    assert rc == 0 and "b1" in out and "ready" in out
    assert await cli.json("offers", "1xcpu") == provisioner.offers
    rc, out, err = await cli("offers", "4xbanana")
    assert rc == 1 and out == "" and err.count("\n") == 1 and "accepted forms" in err
    rc, _, err = await cli("offers", "1xcpu", "--provider", "gcp")
    assert rc == 1 and "unknown provider 'gcp'" in err


async def test_tokens_and_login(
    cli: Cli, api: ApiService, admin_token: str, choline_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = await cli.json("tokens", "create", "ci")
    assert made["token"].startswith("chl_") and made["user"] == "admin"
    listed = await cli.json("tokens", "ls")
    assert {t["name"] for t in listed} == {"admin (created at first start)", "ci"}
    assert all("token" not in t for t in listed)
    rc, out, err = await cli("tokens", "create", "plain")
    assert rc == 0 and out.strip().startswith("chl_") and "shown once" in err

    assert (await cli("tokens", "revoke", made["id"]))[0] == 0
    rc, _, err = await cli("tokens", "revoke", made["id"])
    assert rc == 1 and "no token" in err

    alice = (await cli.json("tokens", "create", "laptop", "--user", "alice"))["token"]
    monkeypatch.delenv("CHOLINE_GATEWAY_URL")
    token_file = choline_home / "secrets" / "token.json"
    before = token_file.read_text()
    rc, _, err = await cli("login", base_url(api), "chl_wrong")
    assert rc == 1 and "unknown or revoked" in err and token_file.read_text() == before

    monkeypatch.setattr("sys.stdin", io.StringIO(alice + "\n"))  # 'choline login URL -' keeps it out of history
    rc, out, _ = await cli("login", base_url(api) + "/", "-")
    assert rc == 0 and out == f"logged in to {base_url(api)} as alice\n"
    assert json.loads(token_file.read_text()) == {"gateway_url": base_url(api), "api_token": alice}
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    assert await cli.json("tokens", "ls") == [t for t in await cli.json("tokens", "ls") if t["user"] == "alice"]
    assert [t["user"] for t in await cli.json("tokens", "ls")] == ["alice"]
    rc, _, err = await cli("tokens", "create", "x", "--user", "bob")
    assert rc == 1 and "only an admin" in err


async def test_unreachable_gateway_and_missing_token(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, choline_home: Path
) -> None:
    monkeypatch.setenv("CHOLINE_GATEWAY_URL", f"http://127.0.0.1:{free_port()}")
    rc, out, err = await cli("ls")
    assert (rc, out) == (1, "")
    assert err.count("\n") == 1 and "control plane not reachable" in err and "choline up" in err
    (choline_home / "secrets" / "token.json").unlink()
    rc, _, err = await cli("show", "r1")
    assert rc == 1 and "no API token" in err


@pytest.mark.slow
async def test_the_installed_command_finds_the_gateway_from_choline_home(
    api: ApiService, http: httpx.AsyncClient, provisioner: StandInProvisioner, choline_home: Path
) -> None:
    """As a user runs it: a separate process, the gateway and token found under CHOLINE_HOME."""
    run_id = await queued(http, provisioner)
    (choline_home / "endpoints.json").write_text(json.dumps({"gateway_url": base_url(api)}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHOLINE_")} | {"CHOLINE_HOME": str(choline_home)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "choline.cli.main", "ls", "--json", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert [r["run_id"] for r in json.loads(out)] == [run_id]
