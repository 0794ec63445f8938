"""Faults real vast.ai hosts have, through the provider: each ends with a working box or a clear
failure, and with nothing left running, listed or billing."""

from __future__ import annotations

import asyncio
import time

import pytest
from vast_emulator import EmulatorServer

from choline_core.errors import NoCapacity, ProvisioningFailed, Retryable
from choline_core.specs import parse_gpu_spec
from choline_provisioner.providers import InstanceRequest, InstanceState, InstanceUnavailable, OfferFilters, localbox
from choline_provisioner.providers.vast import VastProvider, VastUnavailable
from choline_provisioner.sshclient import KeyPair, KnownHosts, SshConnection

from .conftest import assert_clean, make_provider

SPEC = parse_gpu_spec("1x3090")


def request(key: KeyPair, labels: dict[str, str]) -> InstanceRequest:
    return InstanceRequest(ssh_public_key=key.public_key, labels=labels)


async def run_ok(provider: VastProvider, endpoint, key: KeyPair) -> None:  # type: ignore[no-untyped-def]
    async with await SshConnection.open(endpoint, key) as conn:
        res = await conn.run("echo ok", check=True)
        assert res.stdout == "ok\n"


@pytest.mark.slow
async def test_stuck_loading_is_destroyed_and_the_next_offer_runs(
    vast_emulator: EmulatorServer, vast_provider: VastProvider, run_key: KeyPair, labels: dict[str, str]
) -> None:
    emulator = vast_emulator.emulator
    emulator.set_faults({"next_create": ["stuck"]})
    first = (await vast_provider.search_offers(SPEC))[0]
    stuck = await vast_provider.create_instance(first, request(run_key, labels))
    with pytest.raises(ProvisioningFailed, match="still loading"):
        await vast_provider.wait_until_running(stuck, timeout=1.0, interval=0.2)
    assert emulator.box_info(emulator.instances[int(stuck)])["box_state"] == "offline"  # no box was ever started
    # what the provisioner does: destroy it, and take the next offer on another host
    await vast_provider.destroy_instance(stuck)
    assert await vast_provider.status(stuck) is InstanceState.GONE
    offers = await vast_provider.search_offers(SPEC, OfferFilters(exclude_hosts=frozenset({first.host_id})))
    assert offers[0].host_id != first.host_id
    good = await vast_provider.create_instance(offers[0], request(run_key, labels))
    try:
        endpoint = await vast_provider.wait_until_running(good, timeout=30, interval=0.2)
        assert endpoint.user == "root" and endpoint.host == "127.0.0.1"
        await run_ok(vast_provider, endpoint, run_key)
        # vast.ai does not publish host keys: the box's own key was pinned at first contact
        box_key = emulator.box_info(emulator.instances[int(good)])["host_key"]
        assert KnownHosts().get(f"vast/{good}") == " ".join(box_key.split()[:2])
    finally:
        await vast_provider.destroy_instance(good)
    await assert_clean(vast_provider, emulator, labels)


@pytest.mark.slow
async def test_vanished_offer_then_the_next_one(
    vast_emulator: EmulatorServer, vast_provider: VastProvider, run_key: KeyPair, labels: dict[str, str]
) -> None:
    emulator = vast_emulator.emulator
    emulator.set_faults({"next_create": ["vanish"]})
    offers = await vast_provider.search_offers(SPEC)
    with pytest.raises(NoCapacity) as info:
        await vast_provider.create_instance(offers[0], request(run_key, labels))
    assert isinstance(info.value, Retryable)
    assert offers[0].offer_id not in [o.offer_id for o in await vast_provider.search_offers(SPEC)]
    instance_id = await vast_provider.create_instance(offers[1], request(run_key, labels))
    try:
        await run_ok(vast_provider, await vast_provider.wait_until_running(instance_id, timeout=30), run_key)
    finally:
        await vast_provider.destroy_instance(instance_id)
    await assert_clean(vast_provider, emulator, labels)


async def test_refused_create_is_provisioning_failed(
    vast_emulator: EmulatorServer, vast_provider: VastProvider, run_key: KeyPair, labels: dict[str, str]
) -> None:
    vast_emulator.emulator.set_faults({"next_create": ["reject"]})
    offer = (await vast_provider.search_offers(SPEC))[0]
    with pytest.raises(ProvisioningFailed, match="create_failed") as info:
        await vast_provider.create_instance(offer, request(run_key, labels))
    assert not isinstance(info.value, Retryable)
    await assert_clean(vast_provider, vast_emulator.emulator, labels)


async def test_container_that_never_starts(
    vast_emulator: EmulatorServer, vast_provider: VastProvider, run_key: KeyPair, labels: dict[str, str]
) -> None:
    emulator = vast_emulator.emulator
    emulator.set_faults({"next_create": ["boot_fail"], "boot_delay_s": 0.3})
    offer = (await vast_provider.search_offers(SPEC))[0]
    instance_id = await vast_provider.create_instance(offer, request(run_key, labels))
    assert await vast_provider.status(instance_id) is InstanceState.LOADING
    with pytest.raises(ProvisioningFailed, match="exited before it ever ran"):
        await vast_provider.wait_until_running(instance_id, timeout=10, interval=0.1)
    with pytest.raises(InstanceUnavailable, match="OCI runtime create failed"):
        await vast_provider.ssh_endpoint(instance_id)
    (listed,) = await vast_provider.list_instances(labels)
    assert listed.state is InstanceState.EXITED and "OCI" in (listed.message or "")
    await vast_provider.destroy_instance(instance_id)
    await assert_clean(vast_provider, emulator, labels)


@pytest.mark.slow
async def test_host_goes_offline_mid_run(
    vast_emulator: EmulatorServer, vast_provider: VastProvider, run_key: KeyPair, labels: dict[str, str]
) -> None:
    emulator = vast_emulator.emulator
    offer = (await vast_provider.search_offers(SPEC))[0]
    instance_id = await vast_provider.create_instance(offer, request(run_key, labels))
    endpoint = await vast_provider.wait_until_running(instance_id, timeout=30)
    async with await SshConnection.open(endpoint, run_key) as conn:
        bg = await conn.run("nohup sleep 300 > /dev/null 2>&1 < /dev/null & echo $!", check=True)
    pid = int(bg.stdout)
    assert localbox.process_alive(pid)

    assert emulator.machine_offline(int(offer.host_id)) == [int(instance_id)]
    assert await vast_provider.status(instance_id) is InstanceState.OFFLINE
    assert not localbox.process_alive(pid)  # the machine died with everything on it
    with pytest.raises(InstanceUnavailable, match="offline"):
        await vast_provider.ssh_endpoint(instance_id)
    assert offer.offer_id not in [o.offer_id for o in await vast_provider.search_offers(SPEC)]
    assert (await vast_provider.list_instances(labels))[0].state is InstanceState.OFFLINE
    assert emulator.billing()["billing_instances"] == [int(instance_id)]  # still billed until destroyed
    await vast_provider.destroy_instance(instance_id)
    await assert_clean(vast_provider, emulator, labels)
    emulator.machine_online(int(offer.host_id))
    assert offer.offer_id in [o.offer_id for o in await vast_provider.search_offers(SPEC)]


@pytest.mark.slow
async def test_host_dies_while_nobody_asks(
    vast_emulator: EmulatorServer, vast_provider: VastProvider, run_key: KeyPair, labels: dict[str, str]
) -> None:
    emulator = vast_emulator.emulator
    emulator.set_faults({"next_create": ["offline"], "offline_after_s": 0.5})
    offer = (await vast_provider.search_offers(SPEC))[0]
    instance_id = await vast_provider.create_instance(offer, request(run_key, labels))
    await vast_provider.wait_until_running(instance_id, timeout=30, interval=0.1)
    box = emulator.instances[int(instance_id)].box_dir
    deadline = time.monotonic() + 10
    while localbox.box_state(box) != "offline":  # the emulator's ticker kills it on its own
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert await vast_provider.status(instance_id) is InstanceState.OFFLINE
    await vast_provider.destroy_instance(instance_id)
    await assert_clean(vast_provider, emulator, labels)


async def test_rate_limits_and_server_errors_are_retried(
    vast_emulator: EmulatorServer, run_key: KeyPair, labels: dict[str, str]
) -> None:
    emulator = vast_emulator.emulator
    emulator.set_faults({"seed": 7, "error_rate": 0.5, "retry_after_s": 0.01})
    provider = make_provider(vast_emulator, max_attempts=10)
    for _ in range(5):
        assert [o.offer_id for o in await provider.search_offers(SPEC)][:1] == ["21002"]
        assert await provider.list_instances(labels) == []
        assert await provider.status("8999999") is InstanceState.GONE
    injected = emulator.stats["injected"]
    assert injected >= 5 and emulator.stats["injected:429"] and emulator.stats["injected:500"]
    requests = sum(v for k, v in emulator.stats.items() if k.startswith("requests:"))
    assert requests == 15 + injected  # every injected error cost exactly one more request


async def test_errors_that_do_not_stop_are_retryable(vast_emulator: EmulatorServer) -> None:
    emulator = vast_emulator.emulator
    emulator.set_faults({"error_rate": 1.0, "error_statuses": [503]})
    provider = make_provider(vast_emulator, max_attempts=3)
    with pytest.raises(VastUnavailable, match="after 3 tries: 503") as info:
        await provider.search_offers(SPEC)
    assert isinstance(info.value, Retryable)
    assert emulator.stats["requests:search"] == 3


@pytest.mark.slow
async def test_lost_replies_never_rent_twice(
    vast_emulator: EmulatorServer, vast_provider: VastProvider, run_key: KeyPair, labels: dict[str, str]
) -> None:
    emulator = vast_emulator.emulator
    # the create is carried out but its answer is lost, twice in a row (the key attach once):
    # a client retrying blindly would now hold two or three instances
    emulator.set_faults({"lose_replies": ["create", "attach"]})
    offers = await vast_provider.search_offers(SPEC)
    instance_id = await vast_provider.create_instance(offers[0], request(run_key, labels))
    assert list(emulator.instances) == [int(instance_id)]
    assert emulator.stats["lost_replies"] == 2
    endpoint = await vast_provider.wait_until_running(instance_id, timeout=30)
    await run_ok(vast_provider, endpoint, run_key)  # the attached key works
    emulator.set_faults({"lose_replies": ["destroy"]})
    await vast_provider.destroy_instance(instance_id)
    assert emulator.stats["lost_replies"] == 3
    await assert_clean(vast_provider, emulator, labels)


@pytest.mark.slow
async def test_stopped_instance_is_exited_and_starts_again(
    vast_emulator: EmulatorServer, vast_provider: VastProvider, run_key: KeyPair, labels: dict[str, str]
) -> None:
    offer = (await vast_provider.search_offers(SPEC))[0]
    instance_id = await vast_provider.create_instance(offer, request(run_key, labels))
    await vast_provider.wait_until_running(instance_id, timeout=30)
    await vast_provider.stop_instance(instance_id)
    assert await vast_provider.status(instance_id) is InstanceState.EXITED
    with pytest.raises(InstanceUnavailable, match="exited"):
        await vast_provider.ssh_endpoint(instance_id)
    vast_emulator.emulator.set_state(int(instance_id), "running")  # as `vastai start instance` does
    await run_ok(vast_provider, await vast_provider.wait_until_running(instance_id, timeout=30), run_key)
    await vast_provider.destroy_instance(instance_id)
    await assert_clean(vast_provider, vast_emulator.emulator, labels)
