"""The emulator itself: run standalone, used by the real ``vastai`` CLI, the query semantics the
CLI's string values need, paging, admin API, and nothing left running when it stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import vastai
from vast_emulator import Emulator, EmulatorServer

from choline_provisioner.providers import localbox

from .conftest import API_KEY

VASTAI_CLI = str(Path(sys.executable).with_name("vastai"))


def cli(url: str, key: str, *args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "VASTAI_NO_UPDATE_CHECK": "1"}
    env.pop("VAST_API_KEY", None)
    return subprocess.run(
        [VASTAI_CLI, "--url", url, "--api-key", key, *args], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.slow
def test_standalone_with_the_vastai_cli(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.json"
    catalog.write_text(
        json.dumps(
            {
                "offers": [
                    {"id": 1, "machine_id": 11, "gpu_name": "RTX 3090", "num_gpus": 1, "dph_base": 0.2},
                    {"id": 2, "machine_id": 12, "gpu_name": "RTX 3090", "num_gpus": 2, "dph_base": 0.35},
                    {"id": 3, "machine_id": 13, "gpu_name": "H100 SXM", "num_gpus": 1, "dph_base": 2.0},
                    {"id": 4, "gpu_name": "RTX 3090", "num_gpus": 1, "dph_base": 0.1, "reliability": 0.5},
                ]
            }
        )
    )
    boxes, port_file = tmp_path / "boxes", tmp_path / "port"
    key = "standalone-key-123456"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "vast_emulator", "--port", "0", "--key", key, "--catalog", str(catalog)),
            *("--boxes-dir", str(boxes), "--port-file", str(port_file), "--base-python", ""),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "the emulator did not start"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{int(port_file.read_text())}"
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(f"vast emulator on {url} (4 offers")

        # the CLI's string query: values arrive as strings ("0.9"), names with underscores
        res = cli(url, key, "--raw", "search", "offers", "gpu_name=RTX_3090 reliability>0.9", home=tmp_path)
        assert res.returncode == 0, res.stderr
        rows = json.loads(res.stdout)
        assert [r["id"] for r in sorted(rows, key=lambda r: r["dph_total"])] == [1, 2]
        assert {r["gpu_name"] for r in rows} == {"RTX 3090"} and all(r["rentable"] and not r["rented"] for r in rows)
        table = cli(url, key, "search", "offers", "num_gpus>=2", home=tmp_path)
        assert table.returncode == 0 and "RTX_3090" in table.stdout and "H100" not in table.stdout
        denied = cli(url, "wrong-key-0000", "search", "offers", home=tmp_path)
        assert "401" in denied.stdout + denied.stderr

        # rent through the SDK, see it in the CLI, then stop the emulator: nothing survives it
        sdk = vastai.VastAI(api_key=key, server_url=url, retry=1)
        made = sdk.create_instance(id=1, image="x", disk=10, label="demo=1", ssh=True, direct=True)
        iid = made["new_contract"]
        box = boxes / f"i{iid}"
        deadline = time.monotonic() + 30
        while localbox.box_state(box) != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        pid = localbox.read_box(box).pid
        shown = cli(url, key, "--raw", "show", "instances", home=tmp_path)
        assert shown.returncode == 0, shown.stderr
        (row,) = json.loads(shown.stdout)
        assert row["id"] == iid and row["label"] == "demo=1" and row["actual_status"] == "running"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert pid is not None and not localbox.process_alive(pid)
        assert not box.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.slow
def test_bad_flags_and_catalogues(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "vast_emulator", "--boxes-dir", str(tmp_path / "b")]
    no_key = subprocess.run(
        run, capture_output=True, text=True, timeout=60, env={**os.environ, "VAST_EMULATOR_KEY": ""}
    )
    assert no_key.returncode == 2 and "--key" in no_key.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"offers": [{"gpu_name": "RTX 3090", "num_gpus": 1}]}))
    res = subprocess.run([*run, "--key", "k" * 12, "--catalog", str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "'dph_base' is required" in res.stderr


@pytest.fixture
def http(vast_emulator: EmulatorServer) -> httpx.Client:
    return httpx.Client(base_url=vast_emulator.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)


def test_query_semantics(http: httpx.Client) -> None:
    def search(q: dict) -> list[int]:
        r = http.post("/api/v0/bundles/", json=q)
        assert r.status_code == 200, r.text
        return [o["id"] for o in r.json()["offers"]]

    base = {"order": [["dph_total", "asc"]]}
    assert search({**base, "gpu_name": {"eq": "RTX 3090"}, "num_gpus": {"gte": "4"}}) == [21010, 21011]
    assert search({**base, "gpu_name": {"in": ["H100 SXM", "H100 PCIE"]}}) == [21050, 21051]
    # strings compare as the field's type; geolocation matches on its country code
    assert search({**base, "reliability": {"gte": "0.998"}, "geolocation": {"eq": "NO"}}) == [21041, 21042]
    assert search({**base, "geolocation": {"in": ["JP", "SE"]}}) == [21060, 21020]
    assert search({**base, "verified": {"eq": "false"}}) == [21005]
    assert search({**base, "gpu_name": {"eq": "RTX 3090"}, "machine_id": {"notin": [5001, 5002]}, "limit": 2}) == [
        21004,
        21005,
    ]
    assert search({"gpu_name": {"eq": "RTX 4090"}, "order": [["num_gpus", "desc"]]}) == [21021, 21020]
    # a bid search prices at the minimum bid
    r = http.post("/api/v0/bundles/", json={"id": {"eq": 21001}, "type": "bid", "allocated_storage": 0})
    (offer,) = r.json()["offers"]
    assert offer["is_bid"] and offer["dph_total"] == pytest.approx(offer["min_bid"])
    bad = http.post("/api/v0/bundles/", json={"num_gpus": {"about": 2}})
    assert bad.status_code == 400 and bad.json() == {
        "success": False,
        "error": "invalid_query",
        "msg": "unknown operator 'about' on 'num_gpus'",
    }
    assert httpx.post(f"{http.base_url}/api/v0/bundles/", json={}).status_code == 401
    assert http.post("/api/v0/bundles/", params={"api_key": API_KEY}, headers={"Authorization": ""}).status_code == 200


def test_paging_labels_and_admin(vast_emulator: EmulatorServer, http: httpx.Client) -> None:
    emulator = vast_emulator.emulator
    # stuck instances have no box: cheap to make several
    assert http.put("/admin/faults", json={"next_create": ["stuck"] * 3}).status_code == 200
    for ask, label in ((21001, "a=1"), (21002, "b=2"), (21003, "a=1")):
        r = http.put(f"/api/v0/asks/{ask}/", json={"image": "x", "disk": 10, "label": label})
        assert r.status_code == 200 and r.json()["success"], r.text
    # the SDK pages through /api/v1/instances/ with next_token
    sdk = vastai.VastAI(api_key=API_KEY, server_url=vast_emulator.url, retry=1)
    assert [r["actual_status"] for r in sdk.show_instances()] == ["loading"] * 3
    page = sdk.show_instances_v1({"limit": 2, "select_filters": {}, "order_by": [{"col": "id", "dir": "desc"}]})
    assert len(page["instances"]) == 2 and page["total_instances"] == 3 and page["next_token"]
    rest = sdk.show_instances_v1({"limit": 2, "after_token": page["next_token"]})
    assert len(rest["instances"]) == 1 and rest["next_token"] is None
    labelled = sdk.show_instances_v1({"select_filters": {"label": {"in": ["a=1"]}}})
    assert labelled["total_instances"] == 2 and labelled["label_counts"] == {"a=1": 2}
    # rented offers are no longer offered
    r = http.post("/api/v0/bundles/", json={"rented": {"eq": False}, "id": {"in": [21001, 21004]}})
    assert [o["id"] for o in r.json()["offers"]] == [21004]
    # admin: state, validation of faults, offers in and out
    state = http.get("/admin/state").json()
    assert len(state["instances"]) == 3 and state["billing"]["billing_instances"]
    assert http.put("/admin/faults", json={"error_rat": 1}).status_code == 400
    assert (
        http.post("/admin/offers", json={"id": 99, "gpu_name": "L40S", "num_gpus": 1, "dph_base": 0.6}).status_code
        == 200
    )
    assert http.delete("/admin/offers/99").json() == {"success": True}
    assert http.delete("/admin/offers/99").status_code == 404
    for inst in list(emulator.instances):
        assert http.delete(f"/api/v0/instances/{inst}/").json() == {"success": True}
    assert http.delete(f"/api/v0/instances/{inst}/").status_code == 404
    assert http.get(f"/api/v0/instances/{inst}/").json() == {"instances": None}
    assert emulator.billing()["billing_instances"] == [] and emulator.billing()["spent"] > 0


@pytest.mark.slow
def test_a_new_emulator_sweeps_boxes_a_killed_one_left(tmp_path: Path) -> None:
    boxes = tmp_path / "boxes"
    first = Emulator(boxes, base_python=None)
    iid = first.create(21001, {"image": "x", "disk": 10})
    box = first.instances[iid].box_dir
    deadline = time.monotonic() + 30
    while localbox.box_state(box) != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pid = localbox.read_box(box).pid
    # the first emulator dies without cleaning up; the next one on the same folder does it
    Emulator(boxes, base_python=None).close()
    assert pid is not None and not localbox.process_alive(pid)
    assert not box.exists()
