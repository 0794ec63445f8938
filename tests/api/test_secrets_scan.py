"""After a full run on the embedded control plane (``choline up``: NATS in operator mode, S3,
gateway, provisioner, syncer, monitor; a local box over SSH with its agent), no secret the system
holds appears in a log, an event or a database row.

Secrets collected: the S3 secret key, every NATS seed (operator, system, account, the services'
user, each box's user), every SSH private key (the local box host key, each run's key), the API
tokens (admin and a user's), the gateway's own key, a webhook's signing secret and the token in
its URL, and a fake vast.ai key and LLM keys set in the control plane's environment.
Scanned, as raw bytes: every log file (the control plane's and the box's, the run's output),
JetStream's whole file store (every event and message ever published), and every service's SQLite
files (database and write-ahead log). Positive controls prove each scan reads what it should: the
run id is found in each, and the admin token's hash in the gateway's database.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from .conftest import Receiver

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

FAKE_VAST = "vastkey-" + "f4k3" * 12
FAKE_LLM = "sk-fake-llm-" + "0123456789abcdef" * 3
SEED_RE = re.compile(rb"\bS[OAUS][A-Z2-7]{56}\b")
KEY_BLOCK_RE = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----(.*?)-----END [A-Z ]*PRIVATE KEY-----", re.S)
SCRIPT = """\
import os, sys, time
print("hello from the box", flush=True)
for k in sorted(os.environ):
    print(f"env {k}={os.environ[k]}")
print("args", sys.argv[1:])
time.sleep(3)  # the box lives a moment: its credentials are collected meanwhile
"""


def cli(
    home: Path, *args: str, cwd: Path | None = None, timeout: float = 240, **env: str
) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CHOLINE_")}
    full.update(CHOLINE_HOME=str(home), PYTHONUNBUFFERED="1", **env)
    return subprocess.run(
        [sys.executable, "-m", "choline.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=full,
    )


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


class Harvester(threading.Thread):
    """Collects the secret files' contents while the run goes on: a run's SSH key and a box's NATS
    credentials live only as long as the box."""

    def __init__(self, home: Path) -> None:
        super().__init__(daemon=True)
        self.home = home
        self.found: dict[str, bytes] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.harvest()
            self.stop.wait(0.1)
        self.harvest()

    def harvest(self) -> None:
        skip = {"db", "nats", "s3", "logs"}
        for path in files_under(self.home):
            try:
                rel = path.relative_to(self.home)
                if rel.parts[0] in skip or path.stat().st_size > 2_000_000:
                    continue
                data = path.read_bytes()
            except (OSError, ValueError):
                continue  # removed meanwhile
            for seed in SEED_RE.findall(data):
                self.found[f"seed {seed[:4].decode()}... in {rel}"] = seed
            for i, block in enumerate(KEY_BLOCK_RE.findall(data)):
                body = b"".join(block.split())
                # the key material in slices: any 40 consecutive base64 characters of it would be a leak
                for j in range(0, max(1, len(body) - 40), 40):
                    self.found[f"private key in {rel} #{i}.{j}"] = body[j : j + 40]


def collect_secrets(home: Path, harvested: dict[str, bytes], extra: dict[str, str]) -> dict[str, bytes]:
    """Every secret the installation holds, from where it is kept (and what the test made)."""
    found: dict[str, bytes] = {name: value.encode() for name, value in extra.items()}
    found.update(harvested)
    for path in files_under(home / "secrets"):
        if path.suffix == ".json":
            for field, value in json.loads(path.read_text()).items():
                if isinstance(value, str) and field not in ("gateway_url", "nats_creds", "s3_endpoint"):
                    found[f"{path.name}:{field}"] = value.encode()
    assert any(name.startswith("private key") for name in found), "no SSH private key found to check"
    assert sum(name.startswith("seed") for name in found) >= 5, "expected operator, system, account, service, box"
    for name in ("s3.json:s3_secret_key", "token.json:api_token", "api-key.json:api_secret_key"):
        assert name in found, f"missing {name}: {sorted(found)}"
    return {k: v for k, v in found.items() if len(v) >= 16}


def scan(paths: list[Path], secrets: dict[str, bytes]) -> list[str]:
    leaks = []
    for path in paths:
        data = path.read_bytes()
        for name, secret in secrets.items():
            if secret in data:
                leaks.append(f"{name} in {path}")
    return leaks


def test_no_secret_in_logs_events_or_databases(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {
        "CHOLINE_VAST_API_KEY": FAKE_VAST,
        "CHOLINE_LLM_API_KEY": FAKE_LLM,
        "OPENAI_API_KEY": FAKE_LLM + "-openai",
        "CHOLINE_LOSS_TIMEOUT_S": "5",
        "CHOLINE_HEARTBEAT_S": "1",
        "CHOLINE_LOG_LEVEL": "DEBUG",  # the most a log ever says
    }
    up = cli(home, "up", timeout=180, **env)
    if up.returncode != 0:  # a failed `up` may leave components running
        cli(home, "down", timeout=120)
    assert up.returncode == 0, up.stderr[-3000:]
    harvester = Harvester(home)
    harvester.start()
    receiver = Receiver().start()
    url_token = "urltok-" + "9" * 24
    made: dict[str, str] = {}
    try:
        gateway = json.loads((home / "endpoints.json").read_text())["gateway_url"]
        admin = json.loads((home / "secrets" / "token.json").read_text())["api_token"]
        with httpx.Client(base_url=gateway, headers={"Authorization": f"Bearer {admin}"}, timeout=30) as api:
            alice = api.post("/v1/tokens", json={"name": "ci", "user": "alice"}).json()["token"]
            hook = api.post(
                "/v1/webhooks",
                json={"url": f"{receiver.url}?key={url_token}", "events": ["run.started", "run.succeeded"]},
            ).json()
            made = {"alice token": alice, "webhook secret": hook["secret"], "webhook url token": url_token}
        project = tmp_path / "proj"
        project.mkdir()
        (project / "job.py").write_text(SCRIPT)
        run = cli(home, "job.py", "--1xcpu", "--alpha", "1", cwd=project, **env)
        assert run.returncode == 0, run.stderr[-3000:]
        run_id = next(line.split("run ", 1)[1].split()[0] for line in run.stderr.splitlines() if " queued on " in line)
        assert "hello from the box" in run.stdout
        deadline = time.monotonic() + 30
        while len(receiver.delivered()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(receiver.delivered()) == 2, receiver.received  # the webhook worker did sign and send
    finally:
        receiver.stop()
        harvester.stop.set()
        harvester.join(10)
        down = cli(home, "down", timeout=120)
    assert down.returncode == 0, down.stderr[-2000:]

    secrets = collect_secrets(home, harvester.found, {"fake vast key": FAKE_VAST, "fake llm key": FAKE_LLM, **made})
    logs = [p for p in files_under(home / "logs")] + [
        p for p in files_under(home / "boxes") if p.suffix in (".log", ".txt", ".out") or "log" in p.name
    ]
    events = files_under(home / "nats")
    databases = [p for p in files_under(home / "db") if ".sqlite" in p.name]
    assert logs and events and len({p.name.split(".")[0] for p in databases}) >= 4
    # positive controls: each scan reads the bytes that matter
    rid = run_id.encode()
    for what, paths in (("logs", logs), ("events", events), ("databases", databases)):
        assert any(rid in p.read_bytes() for p in paths), f"the run id is in no {what} file: the scan reads nothing"
    digest = hashlib.sha256(admin.encode()).hexdigest().encode()
    assert any(digest in p.read_bytes() for p in databases if p.name.startswith("api.sqlite"))
    assert any(b"hello from the box" in p.read_bytes() for p in logs + events + databases)

    kinds = " ".join(secrets)
    for where in ("/.box/host_key", "keys/", "nats.creds", "nats-service.creds", "nats-auth.json"):
        assert where in kinds, f"no secret collected from {where}: {sorted(secrets)}"
    leaks = scan(logs, secrets) + scan(events, secrets) + scan(databases, secrets)
    assert not leaks, "\n".join(leaks)
    # and none in what the user was shown either, but the secrets handed to them on purpose
    shown = (run.stdout + run.stderr).encode()
    assert not [name for name, s in secrets.items() if s in shown]
