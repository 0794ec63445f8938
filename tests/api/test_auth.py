"""Tokens and users: every endpoint but /healthz needs a token, tokens are stored hashed, the
first start writes an admin token 0600, and one user never sees another's runs."""

from __future__ import annotations

import hashlib
import json
import re
import stat
from pathlib import Path

import httpx
import pytest

from choline_api.main import ApiService
from choline_core.events import RunState

from .conftest import StandInProvisioner, api_settings, base_url, eventually, new_user, running


def db_bytes(home: Path) -> bytes:
    """Everything SQLite holds for the api: the database file and its write-ahead log."""
    return b"".join(p.read_bytes() for p in (home / "db").glob("api.sqlite*"))


async def test_first_start_writes_a_private_admin_token_stored_only_hashed(
    api: ApiService, admin_token: str, choline_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = choline_home / "secrets" / "token.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert set(json.loads(path.read_text())) == {"api_token"}
    assert re.fullmatch(r"chl_[A-Za-z0-9_\-]{43}", admin_token)

    async with httpx.AsyncClient(base_url=base_url(api), headers={"Authorization": f"Bearer {admin_token}"}) as c:
        me = (await c.get("/v1/me")).json()
        made = (await c.post("/v1/tokens", json={"name": "ci"})).json()
    assert me["user"] == "admin" and me["admin"] is True

    raw = db_bytes(choline_home)
    digest = hashlib.sha256(admin_token.encode()).hexdigest()
    assert digest.encode() in raw  # what is stored: the hash
    for secret in (admin_token, made["token"]):
        assert secret.encode() not in raw
        assert secret[4:].encode() not in raw  # not even without the prefix
        assert secret not in caplog.text


async def test_the_admin_token_is_written_only_at_the_first_start(
    nats_server, subjects, bus, choline_home: Path
) -> None:  # type: ignore[no-untyped-def]
    settings = api_settings(nats_server, subjects, choline_home)
    async with running(ApiService(settings)):
        first = (choline_home / "secrets" / "token.json").read_text()
    async with running(ApiService(settings)) as svc:
        assert (choline_home / "secrets" / "token.json").read_text() == first
        async with httpx.AsyncClient(base_url=base_url(svc)) as c:
            token = json.loads(first)["api_token"]
            assert (await c.get("/v1/me", headers={"Authorization": f"Bearer {token}"})).status_code == 200


async def test_every_endpoint_but_healthz_needs_a_valid_token(api: ApiService, http: httpx.AsyncClient) -> None:
    schema = (await http.get("/openapi.json")).json()
    calls = [
        (method.upper(), re.sub(r"\{[^}]+\}", "x", path))
        for path, ops in schema["paths"].items()
        for method in ops
        if path != "/healthz"
    ]
    assert len(calls) >= 15
    async with httpx.AsyncClient(base_url=base_url(api)) as anon:
        for method, path in calls:
            for headers in ({}, {"Authorization": "Bearer chl_not-a-real-token"}, {"Authorization": "Basic eDp5"}):
                resp = await anon.request(method, path, headers=headers, json={})
                assert resp.status_code == 401, (method, path, headers, resp.text)
                body = resp.json()
                assert body["type"] == "unauthorized" and body["message"] and "detail" in body
                assert resp.headers["www-authenticate"] == "Bearer"
        health = await anon.get("/healthz")
        assert health.status_code == 200 and health.json()["checks"] == {"nats": True, "database": True}


async def test_tokens_create_list_revoke(api: ApiService, http: httpx.AsyncClient) -> None:
    made = await http.post("/v1/tokens", json={"name": "laptop"})
    assert made.status_code == 201
    token = made.json()
    assert token["user"] == "admin" and token["token"].startswith(token["prefix"])

    listed = (await http.get("/v1/tokens")).json()
    assert {t["name"] for t in listed} == {"admin (created at first start)", "laptop"}
    assert all("token" not in t for t in listed)

    async with httpx.AsyncClient(base_url=base_url(api), headers={"Authorization": f"Bearer {token['token']}"}) as c:
        assert (await c.get("/v1/me")).json()["token_name"] == "laptop"
        assert (await http.delete(f"/v1/tokens/{token['id']}")).status_code == 204
        gone = await c.get("/v1/me")
        assert gone.status_code == 401 and gone.json()["type"] == "unauthorized"
    again = await http.delete(f"/v1/tokens/{token['id']}")
    assert again.status_code == 404 and again.json()["type"] == "not_found"

    # the last admin token cannot be revoked: nobody could get back in
    mine = (await http.get("/v1/me")).json()["token_id"]
    refused = await http.delete(f"/v1/tokens/{mine}")
    assert refused.status_code == 409 and refused.json()["type"] == "conflict"
    assert (await http.get("/v1/me")).status_code == 200


async def test_a_user_manages_only_their_own_tokens(api: ApiService, http: httpx.AsyncClient) -> None:
    alice = await new_user(http, "alice")
    async with alice:
        assert (await alice.get("/v1/me")).json() == {
            "user": "alice",
            "admin": False,
            "token_id": (await alice.get("/v1/me")).json()["token_id"],
            "token_name": "alice-laptop",
        }
        denied = await alice.post("/v1/tokens", json={"name": "x", "user": "bob"})
        assert denied.status_code == 403 and denied.json()["type"] == "forbidden"
        assert (await alice.post("/v1/tokens", json={"name": "x", "admin": True})).status_code == 403
        assert [t["user"] for t in (await alice.get("/v1/tokens", params={"all": "true"})).json()] == ["alice"]
        admin_tokens = (await http.get("/v1/tokens")).json()
        assert (await alice.delete(f"/v1/tokens/{admin_tokens[0]['id']}")).status_code == 404
    everyone = (await http.get("/v1/tokens", params={"all": "true"})).json()
    assert {t["user"] for t in everyone} == {"admin", "alice"}


async def test_one_user_cannot_see_or_touch_another_users_runs(
    api: ApiService, http: httpx.AsyncClient, provisioner: StandInProvisioner
) -> None:
    alice, bob = await new_user(http, "alice"), await new_user(http, "bob")
    async with alice, bob:
        mine = (await alice.post("/v1/runs", json={"script": "train.py", "name": "alice-run"})).json()
        run_id = mine["run_id"]
        assert mine["owner"] == "alice"
        await bob.post("/v1/runs", json={"script": "other.py", "name": "bob-run"})

        # not yet seen by the provisioner (from the gateway's record) and once it is
        for _ in range(2):
            for path in (
                f"/v1/runs/{run_id}",
                f"/v1/runs/{run_id}/logs",
                f"/v1/runs/{run_id}/metrics",
                f"/v1/runs/{run_id}/metrics/keys",
                f"/v1/runs/{run_id}/checkpoints",
                f"/v1/runs/{run_id}/artifacts",
            ):
                resp = await bob.get(path)
                assert resp.status_code == 404 and resp.json()["type"] == "not_found", path
            stop = await bob.post(f"/v1/runs/{run_id}/control", json={"action": "stop"})
            assert stop.status_code == 404
            assert [r["name"] for r in (await bob.get("/v1/runs")).json()["runs"]] == ["bob-run"]
            assert [r["name"] for r in (await alice.get("/v1/runs")).json()["runs"]] == ["alice-run"]
            await eventually(lambda: run_id in provisioner.runs)
        await provisioner.set_state(run_id, RunState.running)

        everyone = (await http.get("/v1/runs")).json()["runs"]
        assert {r["name"] for r in everyone} == {"alice-run", "bob-run"}
        assert (await http.get(f"/v1/runs/{run_id}")).json()["owner"] == "alice"
        # the provisioner was asked for alice's runs only, on her behalf
        queries = [q.data for q in provisioner.queries if q.type == "rpc.run_query"]
        assert {q["owner"] for q in queries} == {"alice", "bob", None}
