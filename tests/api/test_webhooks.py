"""Webhooks against a real HTTP receiver on loopback: signed deliveries for the events a user chose,
retries after 5xx, no retry after a refusal, nothing lost across a gateway restart, Slack/Discord
bodies, one user never seeing another's endpoints, secrets never stored or logged in clear."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from choline_api.main import DEPLOY_CHANGED, ApiService
from choline_api.webhooks import verify
from choline_core.bus import Bus
from choline_core.embedded import NatsServer, free_port
from choline_core.events import Envelope, FindingRaised, RunState, Severity
from choline_core.subjects import Subjects

from .conftest import Receiver, StandInProvisioner, api_settings, base_url, eventually, new_user, running
from .test_auth import db_bytes

FAST = {"api_webhook_backoff_s": 0.05, "api_webhook_poll_s": 0.2, "api_webhook_max_attempts": 4}


@pytest.fixture
async def hooked(
    nats_server: NatsServer, subjects: Subjects, bus: Bus, choline_home: Path
) -> AsyncIterator[ApiService]:
    async with running(ApiService(api_settings(nats_server, subjects, choline_home, **FAST))) as svc:
        yield svc


@pytest.fixture
async def admin(hooked: ApiService, choline_home: Path) -> AsyncIterator[httpx.AsyncClient]:
    token = json.loads((choline_home / "secrets" / "token.json").read_text())["api_token"]
    async with httpx.AsyncClient(base_url=base_url(hooked), headers={"Authorization": f"Bearer {token}"}) as c:
        yield c


def my_verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """The receiver's side, written from the documented scheme (not the gateway's code)."""
    ts = headers["x-choline-timestamp"]
    expected = "v1=" + hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    return abs(time.time() - int(ts)) < 300 and hmac.compare_digest(expected, headers["x-choline-signature"])


async def add_hook(client: httpx.AsyncClient, url: str, events: list[str], fmt: str = "choline") -> dict[str, Any]:
    resp = await client.post("/v1/webhooks", json={"url": url, "events": events, "format": fmt})
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


async def queued_run(client: httpx.AsyncClient, provisioner: StandInProvisioner, name: str) -> str:
    run_id = str((await client.post("/v1/runs", json={"script": "train.py", "name": name})).json()["run_id"])
    await eventually(lambda: run_id in provisioner.runs)
    return run_id


async def test_signed_deliveries_for_the_chosen_run_events(
    hooked: ApiService,
    admin: httpx.AsyncClient,
    provisioner: StandInProvisioner,
    receiver: Receiver,
    choline_home: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    alice, bob = await new_user(admin, "alice"), await new_user(admin, "bob")
    async with alice, bob:
        events = ["run.started", "run.recovered", "run.paused", "run.succeeded"]
        hook = await add_hook(alice, receiver.url + "/alice?token=s3cr3t-in-url", events)
        secret = hook["secret"]
        assert secret.startswith("whsec_") and hook["owner"] == "alice"
        assert hook["url"] == f"http://127.0.0.1:{receiver.port}/hook/..."  # redacted: the query holds a token
        await add_hook(bob, receiver.url + "/bob", ["run.started", "run.failed"])

        run_id = await queued_run(alice, provisioner, "digits")
        for state in (
            RunState.running,  # started
            RunState.recovering,
            RunState.provisioning,
            RunState.running,  # recovered
            RunState.pausing,
            RunState.paused,  # paused
            RunState.queued,
            RunState.running,  # resumed: not an event anyone asked for
            RunState.succeeded,  # succeeded
        ):
            await provisioner.set_state(run_id, state, "box lost" if state == RunState.recovering else None)
        await eventually(lambda: len(receiver.delivered()) >= 4)
        await asyncio.sleep(0.5)  # and nothing more arrives

        got = receiver.delivered()
        assert all(r["path"].startswith("/hook/alice") for r in got)
        bodies = [json.loads(r["body"]) for r in got]
        assert sorted(b["type"] for b in bodies) == sorted(events)
        for r, b in zip(got, bodies, strict=True):
            assert my_verify(secret, r["headers"], r["body"])
            assert verify(secret, r["headers"]["x-choline-timestamp"], r["headers"]["x-choline-signature"], r["body"])
            assert not verify(
                secret, r["headers"]["x-choline-timestamp"], r["headers"]["x-choline-signature"], r["body"] + b" "
            )
            assert r["headers"]["x-choline-event"] == b["type"] and r["headers"]["x-choline-event-id"] == b["id"]
            assert b["data"]["run_id"] == run_id and b["data"]["name"] == "digits"
        recovered = next(b for b in bodies if b["type"] == "run.recovered")
        assert recovered["data"]["state"] == "running"

        # the secret is shown once: never listed, never stored or logged in clear, nor the URL's token
        listed = (await alice.get("/v1/webhooks")).json()
        assert [h["id"] for h in listed] == [hook["id"]] and "secret" not in listed[0]
        assert listed[0]["delivered"] == 4
        raw = db_bytes(choline_home)
        for text in (secret, secret[6:], "s3cr3t-in-url"):
            assert text.encode() not in raw and text not in caplog.text

        # bob's run fails: bob asked for run.failed
        bob_run = await queued_run(bob, provisioner, "bobs")
        await provisioner.set_state(bob_run, RunState.failed, "exit code 1")
        await eventually(lambda: any(r["path"] == "/hook/bob" for r in receiver.delivered()))
        failed = json.loads(next(r for r in receiver.delivered() if r["path"] == "/hook/bob")["body"])
        assert failed["type"] == "run.failed" and failed["data"]["reason"] == "exit code 1"


async def test_retries_after_5xx_and_not_after_a_refusal(
    hooked: ApiService, admin: httpx.AsyncClient, receiver: Receiver
) -> None:
    hook = await add_hook(admin, receiver.url, ["run.failed"])
    log_of = f"/v1/webhooks/{hook['id']}/deliveries"

    receiver.statuses = [500, 503, 429]
    assert (await admin.post(f"/v1/webhooks/{hook['id']}/test")).status_code == 202
    await eventually(lambda: len(receiver.delivered()) == 1)
    first = (await admin.get(log_of)).json()["deliveries"]
    assert len(first) == 1
    d = first[0]
    assert d["state"] == "delivered" and d["event_type"] == "ping" and d["attempts"] == 4
    assert [t["status"] for t in d["tries"]] == [500, 503, 429, 200]
    assert [r["status"] for r in receiver.received] == [500, 503, 429, 200]
    # every try carries the same event id and body, each with a fresh valid signature
    assert len({r["headers"]["x-choline-event-id"] for r in receiver.received}) == 1
    assert len({r["body"] for r in receiver.received}) == 1
    assert all(my_verify(hook["secret"], r["headers"], r["body"]) for r in receiver.received)

    receiver.statuses = [410]  # the receiver refuses it: retrying cannot help
    await admin.post(f"/v1/webhooks/{hook['id']}/test")
    await eventually(lambda: _state(admin, log_of, "failed", attempts=1))
    refused = (await admin.get(log_of)).json()["deliveries"][0]
    assert refused["last_status"] == 410 and refused["last_error"] == "HTTP 410"
    assert len(receiver.received) == 5

    receiver.statuses = [500] * 10  # gives up after CHOLINE_API_WEBHOOK_MAX_ATTEMPTS (4 here)
    await admin.post(f"/v1/webhooks/{hook['id']}/test")
    await eventually(lambda: _state(admin, log_of, "failed", attempts=4), timeout=15)
    await asyncio.sleep(0.5)
    assert len(receiver.received) == 9
    counts = (await admin.get(f"/v1/webhooks/{hook['id']}")).json()
    assert (counts["delivered"], counts["failed"], counts["pending"]) == (1, 2, 0)


async def _state(client: httpx.AsyncClient, path: str, state: str, attempts: int | None = None) -> bool:
    newest = (await client.get(path)).json()["deliveries"][0]
    return bool(newest["state"] == state and (attempts is None or newest["attempts"] == attempts))


@pytest.mark.slow
async def test_nothing_is_lost_across_a_gateway_restart(
    nats_server: NatsServer, subjects: Subjects, bus: Bus, choline_home: Path
) -> None:
    port = free_port()
    receiver = Receiver(port)  # not listening yet: connection refused
    settings = api_settings(nats_server, subjects, choline_home, **{**FAST, "api_webhook_max_attempts": 50})
    provisioner = await StandInProvisioner(bus).start()
    token = ""
    async with running(ApiService(settings)) as svc:
        token = json.loads((choline_home / "secrets" / "token.json").read_text())["api_token"]
        async with httpx.AsyncClient(base_url=base_url(svc), headers={"Authorization": f"Bearer {token}"}) as c:
            hook = await add_hook(c, receiver.url, ["run.started", "run.succeeded"])
            run_id = await queued_run(c, provisioner, "restart")
            await provisioner.set_state(run_id, RunState.running)
            await eventually(lambda: _tried(c, hook["id"]), timeout=10)
    # the gateway is down: the run ends meanwhile (the event waits in JetStream)
    await provisioner.set_state(run_id, RunState.succeeded)
    receiver.start()
    try:
        async with (
            running(ApiService(settings)) as svc,
            httpx.AsyncClient(base_url=base_url(svc), headers={"Authorization": f"Bearer {token}"}) as c,
        ):
            await eventually(lambda: len(receiver.delivered()) == 2, timeout=20)
            log = (await c.get(f"/v1/webhooks/{hook['id']}/deliveries")).json()["deliveries"]
        types = sorted(json.loads(r["body"])["type"] for r in receiver.delivered())
        assert types == ["run.started", "run.succeeded"]
        started = next(d for d in log if d["event_type"] == "run.started")
        assert started["state"] == "delivered" and started["attempts"] >= 2
        assert started["tries"][0]["status"] is None and "Connect" in (started["tries"][0]["error"] or "")
        assert all(my_verify(hook["secret"], r["headers"], r["body"]) for r in receiver.delivered())
    finally:
        receiver.stop()


async def _tried(client: httpx.AsyncClient, hook_id: str) -> bool:
    log = (await client.get(f"/v1/webhooks/{hook_id}/deliveries")).json()["deliveries"]
    return bool(log and log[0]["attempts"] >= 1)


async def test_findings_deployments_chat_formats_and_isolation(
    hooked: ApiService,
    admin: httpx.AsyncClient,
    provisioner: StandInProvisioner,
    receiver: Receiver,
    bus: Bus,
) -> None:
    alice, bob = await new_user(admin, "alice"), await new_user(admin, "bob")
    async with alice, bob:
        a_hook = await add_hook(alice, receiver.url + "/slack", ["finding.raised"], fmt="slack")
        b_hook = await add_hook(bob, receiver.url + "/discord", ["finding.raised", "deployment.ready"], fmt="discord")
        run_id = await queued_run(alice, provisioner, "watched")
        finding = FindingRaised(
            finding_id="f1",
            run_id=run_id,
            detector="divergence",
            severity=Severity.critical,
            step=420,
            message="loss diverged",
        )
        await bus.publish(bus.subjects.monitor_findings(), finding)
        await bus.publish(bus.subjects.monitor_findings(), finding)  # republished: delivered once
        deployed = Envelope(
            type="deploy.changed",
            data={"name": "digits", "version": "3", "state": "ready", "url": "http://x/predict", "owner": "bob"},
        )
        await bus.publish(bus.subjects.deploy(DEPLOY_CHANGED), deployed)
        await eventually(lambda: len(receiver.delivered()) >= 2)
        await asyncio.sleep(0.5)
        by_path = {r["path"]: r for r in receiver.delivered()}
        assert set(by_path) == {"/hook/slack", "/hook/discord"}
        slack = json.loads(by_path["/hook/slack"]["body"])
        assert slack == {"text": f"choline: critical on run {run_id} (watched) at step 420: loss diverged"}
        discord = json.loads(by_path["/hook/discord"]["body"])
        assert discord == {"content": "choline: deployment digits is ready at http://x/predict"}
        assert my_verify(a_hook["secret"], by_path["/hook/slack"]["headers"], by_path["/hook/slack"]["body"])

        # one user never sees or touches another's webhooks
        for method, path in (
            ("GET", f"/v1/webhooks/{a_hook['id']}"),
            ("DELETE", f"/v1/webhooks/{a_hook['id']}"),
            ("POST", f"/v1/webhooks/{a_hook['id']}/test"),
            ("GET", f"/v1/webhooks/{a_hook['id']}/deliveries"),
        ):
            resp = await bob.request(method, path)
            assert resp.status_code == 404 and resp.json()["type"] == "not_found", (method, path)
        assert [h["id"] for h in (await bob.get("/v1/webhooks", params={"all": "true"})).json()] == [b_hook["id"]]
        everyone = (await admin.get("/v1/webhooks", params={"all": "true"})).json()
        assert {h["id"] for h in everyone} == {a_hook["id"], b_hook["id"]}
        # removing one cancels its pending deliveries and stops new ones
        assert (await alice.delete(f"/v1/webhooks/{a_hook['id']}")).status_code == 204
        assert (await alice.get(f"/v1/webhooks/{a_hook['id']}")).status_code == 404
        assert (await alice.get("/v1/webhooks")).json() == []


async def test_bad_webhooks_are_refused_with_the_error_body(hooked: ApiService, admin: httpx.AsyncClient) -> None:
    for body in (
        {"url": "ftp://example.com/x", "events": ["run.failed"]},
        {"url": "http://example.com/x", "events": []},
        {"url": "http://example.com/x", "events": ["run.exploded"]},
        {"url": "http://example.com/x", "events": ["run.failed"], "format": "teams"},
        {"url": "http://example.com/x", "events": ["run.failed"], "secret": "mine"},
        {"url": "http://user:pw@example.com/x", "events": ["run.failed"]},
    ):
        resp = await admin.post("/v1/webhooks", json=body)
        assert resp.status_code in (400, 422), (body, resp.text)
        assert set(resp.json()) == {"type", "message", "detail"}
    assert (await admin.get("/v1/webhooks/wnope")).status_code == 404
    assert (await admin.get("/v1/webhooks")).json() == []


async def test_the_webhooks_cli(
    hooked: ApiService,
    admin: httpx.AsyncClient,
    receiver: Receiver,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from .test_cli import Cli

    monkeypatch.setenv("CHOLINE_GATEWAY_URL", base_url(hooked))
    cli = Cli(capsys)
    rc, out, err = await cli(
        "webhooks", "add", receiver.url, "--events", "run.failed,run.succeeded", "--events", "finding.raised"
    )
    assert rc == 0, err
    secret = out.strip()
    assert secret.startswith("whsec_") and "shown once" in err
    listed = await cli.json("webhooks", "ls")
    assert len(listed) == 1 and listed[0]["events"] == ["finding.raised", "run.failed", "run.succeeded"]
    assert "secret" not in listed[0]
    hook_id = listed[0]["id"]
    rc, out, _ = await cli("webhooks", "ls")
    assert rc == 0 and hook_id in out and "DELIVERED" in out and secret not in out
    rc, out, _ = await cli("webhooks", "test", hook_id)
    assert rc == 0 and "ping" in out
    await eventually(lambda: len(receiver.delivered()) == 1)
    assert my_verify(secret, receiver.received[0]["headers"], receiver.received[0]["body"])
    log = await cli.json("webhooks", "log", hook_id)
    await eventually(lambda: _state(admin, f"/v1/webhooks/{hook_id}/deliveries", "delivered"))
    assert log[0]["event_type"] == "ping"
    rc, out, _ = await cli("webhooks", "log", hook_id)
    assert rc == 0 and "ping" in out
    # bad usage: exit 2, one line; an unknown id: exit 1, one line
    rc, _, err = await cli("webhooks", "add", receiver.url, "--events", "run.exploded")
    assert rc == 2 and err.count("\n") == 1 and "run.exploded" in err
    rc, _, err = await cli("webhooks", "rm", "wnope")
    assert rc == 1 and err.startswith("choline: error:") and err.count("\n") == 1
    rc, out, _ = await cli("webhooks", "rm", hook_id)
    assert rc == 0 and (await cli.json("webhooks", "ls")) == []
    rc, _, _ = await cli("webhooks")
    assert rc == 2
