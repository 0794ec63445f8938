"""The local provider: the contract, plus what only local boxes promise."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from choline_core.errors import NotYetReady, ProvisioningFailed
from choline_core.specs import parse_gpu_spec
from choline_provisioner.providers import (
    InstanceRequest,
    InstanceState,
    InstanceUnavailable,
    Provider,
    SshEndpoint,
    localbox,
)
from choline_provisioner.providers.local import LocalProvider, local_gpus
from choline_provisioner.sshclient import KeyPair, SshConnection, SshUnreachable

from .contract import ProviderContract


class TestLocalContract(ProviderContract):
    unknown_instance_id = "box-000000000000"

    @pytest.fixture
    def provider(self, local_provider: LocalProvider) -> Provider:
        return local_provider


async def _box(provider: LocalProvider, key: KeyPair, labels: dict[str, str], **req: Any) -> tuple[str, SshEndpoint]:
    offer = (await provider.search_offers(parse_gpu_spec("cpu")))[0]
    instance_id = await provider.create_instance(
        offer, InstanceRequest(ssh_public_key=key.public_key, labels=labels, **req)
    )
    return instance_id, await provider.wait_until_running(instance_id, timeout=30)


async def test_offers_describe_this_machine(local_provider: LocalProvider) -> None:
    offers = await local_provider.search_offers(parse_gpu_spec("cpu"))
    assert len(offers) == 1
    (offer,) = offers
    assert offer.price_per_hour == 0 and offer.reliability == 1
    assert offer.cpu_cores == os.cpu_count() and (offer.disk_gb or 0) > 0
    gpus = local_gpus()
    assert offer.gpu_count == len(gpus)  # no GPU here: 1xcpu; with nvidia-smi GPUs: those
    assert offer.machine == ("1xcpu" if not gpus else offer.machine)


@pytest.mark.slow
async def test_a_sigkilled_box_is_offline_then_gone(
    local_provider: LocalProvider, run_key: KeyPair, labels: dict[str, str]
) -> None:
    instance_id, endpoint = await _box(local_provider, run_key, labels)
    async with await SshConnection.open(endpoint, run_key) as conn:
        bg = await conn.run("nohup sleep 300 > /dev/null 2>&1 < /dev/null & echo $!", check=True)
        escaped = await conn.run("setsid nohup sleep 301 > /dev/null 2>&1 < /dev/null & echo $!", check=True)
    pids = [int(bg.stdout), int(escaped.stdout)]
    (listed,) = await local_provider.list_instances(labels)
    assert listed.pid and listed.state is InstanceState.RUNNING

    os.killpg(listed.pid, signal.SIGKILL)  # the machine dies: its whole process group at once
    deadline = time.monotonic() + 10
    while await local_provider.status(instance_id) is not InstanceState.OFFLINE:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert not localbox.process_alive(pids[0])  # it was in the group
    assert (await local_provider.list_instances(labels))[0].state is InstanceState.OFFLINE
    with pytest.raises(InstanceUnavailable, match="offline"):
        await local_provider.ssh_endpoint(instance_id)
    with pytest.raises(SshUnreachable):
        await SshConnection.open(endpoint, run_key, connect_timeout=3)

    await local_provider.destroy_instance(instance_id)  # also finds what left the group (setsid)
    assert await local_provider.status(instance_id) is InstanceState.GONE
    assert not localbox.process_alive(pids[1])
    assert await local_provider.list_instances(labels) == []


@pytest.mark.slow
async def test_kill_and_clean_stop(local_provider: LocalProvider, run_key: KeyPair, labels: dict[str, str]) -> None:
    killed, _ = await _box(local_provider, run_key, labels)
    stopped, _ = await _box(local_provider, run_key, labels)
    await local_provider.kill(killed)
    assert await local_provider.status(killed) is InstanceState.OFFLINE
    await localbox.stop_box(local_provider.box_dir(stopped))
    assert await local_provider.status(stopped) is InstanceState.EXITED
    states = {i.instance_id: i.state for i in await local_provider.list_instances(labels)}
    assert states == {killed: InstanceState.OFFLINE, stopped: InstanceState.EXITED}


@pytest.mark.slow
async def test_boxes_share_the_base_environment(
    local_provider: LocalProvider, run_key: KeyPair, labels: dict[str, str]
) -> None:
    import sysconfig

    base_site = Path(sysconfig.get_paths()["purelib"]).resolve()
    instance_id, endpoint = await _box(local_provider, run_key, labels)
    box_dir = local_provider.box_dir(instance_id)
    code = (
        "import json, sys, site, torch, choline_agent, choline_core; "
        "print(json.dumps({'prefix': sys.prefix, 'torch': torch.__file__, 'site': site.getsitepackages()[0], "
        "'version': torch.__version__, 'exe': sys.executable}))"
    )
    async with await SshConnection.open(endpoint, run_key) as conn:
        res = await conn.run(f'python -c "{code}"', check=True, timeout=120)
    seen = json.loads(res.stdout)
    assert Path(seen["prefix"]) == box_dir / ".venv"  # the box's own environment ...
    assert Path(seen["exe"]).parent == box_dir / ".venv" / "bin"
    assert Path(seen["site"]).is_relative_to(box_dir / ".venv")  # ... whose packages come first ...
    assert Path(seen["torch"]).resolve().is_relative_to(base_site)  # ... and torch from the shared base
    assert seen["version"].startswith("2.13.0")
    env_bytes = sum(p.stat().st_size for p in (box_dir / ".venv").rglob("*") if p.is_file() and not p.is_symlink())
    assert env_bytes < 1_000_000, env_bytes  # nothing was installed or copied into the box
    assert not list((box_dir / ".venv").rglob("torch"))


@pytest.mark.slow
async def test_the_base_environment_is_configurable(
    choline_home: Path, run_key: KeyPair, labels: dict[str, str]
) -> None:
    bare = getattr(sys, "_base_executable", None)
    assert bare and Path(bare).exists()
    probe = subprocess.run([bare, "-c", "import torch"], capture_output=True)
    assert probe.returncode != 0, "the bare interpreter has torch; pick another bare base for this test"
    provider = LocalProvider(home=choline_home, base_python=bare)
    try:
        instance_id, endpoint = await _box(provider, run_key, labels)
        async with await SshConnection.open(endpoint, run_key) as conn:
            res = await conn.run('python -c "import sys; print(sys.prefix)"; python -c "import torch"')
        assert res.stdout.strip() == str(provider.box_dir(instance_id) / ".venv")
        assert res.exit_status != 0 and "No module named 'torch'" in res.stderr
    finally:
        for d in provider.boxes_dir.iterdir():
            localbox.remove_box(d)


async def test_no_secret_of_the_caller_reaches_a_box(
    local_provider: LocalProvider, run_key: KeyPair, labels: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHOLINE_S3_SECRET_KEY", "s3-secret-value-123")
    monkeypatch.setenv("VAST_API_KEY", "vast-key-value-456")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-789")
    instance_id, endpoint = await _box(local_provider, run_key, labels, env={"RUN_VISIBLE": "yes"})
    async with await SshConnection.open(endpoint, run_key) as conn:
        env = (await conn.run("env", check=True)).stdout
        server_env = (
            await conn.run(f"cat /proc/{(await local_provider.list_instances(labels))[0].pid}/environ")
        ).stdout
    for text in (env, server_env):
        for secret in ("s3-secret-value-123", "vast-key-value-456", "aws-secret-789"):
            assert secret not in text
    assert "RUN_VISIBLE=yes" in env
    box_dir = local_provider.box_dir(instance_id)
    assert f"HOME={box_dir}" in env and f"TMPDIR={box_dir / 'tmp'}" in env
    assert stat.S_IMODE(box_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((box_dir / ".box" / "host_key").stat().st_mode) == 0o600


def test_localbox_runs_standalone(tmp_path: Path, run_key: KeyPair) -> None:
    """``python -m ...localbox`` with the documented flags (what the vast.ai emulator runs)."""
    box_dir = tmp_path / "standalone"
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(run_key.public_key + "\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "choline_provisioner.providers.localbox",
            "--dir",
            str(box_dir),
            "--port",
            "0",
            "--authorized-key",
            str(authorized),
            "--host-key",
            str(tmp_path / "hk"),
            "--base-python",
            "",
        ],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while (info := localbox.read_box(box_dir)).state != "running":  # gone until the server made the folder
            assert proc.poll() is None and time.monotonic() < deadline, info
            time.sleep(0.02)
        assert info.port and info.pid == proc.pid and (tmp_path / "hk").exists()

        async def check() -> str:
            endpoint = SshEndpoint(
                host="127.0.0.1", port=info.port or 0, user=info.user or "", host_key_alias="standalone"
            )
            async with await SshConnection.open(endpoint, run_key) as conn:
                return (await conn.run("pwd")).stdout.strip()

        assert asyncio.run(check()) == str(box_dir.resolve())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert localbox.box_state(box_dir) == "exited"
    finally:
        if proc.poll() is None:  # a failure above: this test started it, this test ends it
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        localbox.remove_box(box_dir)
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "choline_provisioner.providers.localbox",
            "--dir",
            str(tmp_path / "b"),
            "--authorized-key",
            "not a key",
            "--host-key",
            str(tmp_path / "hk2"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "neither a file nor a public key" in bad.stderr


async def test_waiting_gives_up_on_a_box_that_dies_or_hangs(
    choline_home: Path, run_key: KeyPair, labels: dict[str, str], tmp_path: Path
) -> None:
    """``wait_until_running`` turns a dead or stuck instance into ProvisioningFailed (take another offer)."""
    hangs = tmp_path / "hangs"
    hangs.write_text("#!/bin/sh\nexec sleep 60\n")
    hangs.chmod(0o755)
    for python, expect in (("/bin/false", "offline before it ever ran"), (str(hangs), "still loading after")):
        provider = LocalProvider(home=choline_home, python=python)
        offer = (await provider.search_offers(parse_gpu_spec("cpu")))[0]
        instance_id = await provider.create_instance(
            offer, InstanceRequest(ssh_public_key=run_key.public_key, labels=labels)
        )
        with pytest.raises(ProvisioningFailed, match=expect):
            await provider.wait_until_running(instance_id, timeout=1.0, interval=0.05)
        if expect.startswith("still"):
            with pytest.raises(NotYetReady):
                await provider.ssh_endpoint(instance_id)
        await provider.destroy_instance(instance_id)
        assert await provider.status(instance_id) is InstanceState.GONE
