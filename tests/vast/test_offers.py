"""vast offers: the query and floors, ranking, host exclusion, GPU names, interruptible bids.

The emulator's default catalogue (``vast_emulator.catalog.default_offers``) holds three good
1x RTX 3090 offers (21001-21003), six that each fail one default floor (21004 reliability 0.90,
21005 unverified, 21006 no direct port, 21007 18 Mbit/s, 21008 CUDA 11.4, 21009 12 GB disk), a
4x (21010) and an 8x (21011) 3090, and A100/H100/... offers.
"""

from __future__ import annotations

import pytest
from vast_emulator import EmulatorServer

from choline_core.errors import NoCapacity, ProvisioningFailed, Unauthorized
from choline_core.specs import parse_gpu_spec
from choline_provisioner.providers import InstanceRequest, OfferFilters, get_provider
from choline_provisioner.providers.vast import VastProvider, VastUnavailable, vast_gpu_model, vast_state
from choline_provisioner.sshclient import KeyPair

from .conftest import API_KEY, assert_clean, make_provider


def ids(offers: list) -> list[str]:
    return [o.offer_id for o in offers]


async def test_default_floors_and_ranking(vast_provider: VastProvider) -> None:
    offers = await vast_provider.search_offers(parse_gpu_spec("1x3090"))
    # each offer failing one floor is gone; the rest ranked by $/requested GPU-hour / reliability
    assert ids(offers) == ["21002", "21001", "21003", "21010", "21011"]
    best = offers[0]
    assert best.provider == "vast" and best.gpu_name == "RTX 3090" and best.gpu_count == 1
    assert best.host_id == "5002" and best.extra["host_id"] == 102 and best.extra["machine_id"] == 5002
    assert best.gpu_memory_gb == 24.0 and best.reliability == pytest.approx(0.991)
    assert best.location == "Bavaria, DE" and best.inet_down_mbps == 610
    # the price includes the default 40 GB of storage at $0.15/GB/month
    assert best.price_per_hour == pytest.approx(0.19 + 0.15 * 40 / 720, abs=1e-6)
    assert best.extra["min_bid"] == pytest.approx(0.19 * 0.45, abs=1e-4)


async def test_filters_on_top_of_the_floors(vast_provider: VastProvider) -> None:
    spec = parse_gpu_spec("1x3090")
    cheap = await vast_provider.search_offers(spec, OfferFilters(max_price_per_hour=0.21))
    assert ids(cheap) == ["21002"]
    # a run never goes back to a host it lost (machine ids), and stricter floors apply
    elsewhere = await vast_provider.search_offers(spec, OfferFilters(exclude_hosts=frozenset({"5002", "5001"})))
    assert ids(elsewhere) == ["21003", "21010", "21011"]
    reliable = await vast_provider.search_offers(spec, OfferFilters(min_reliability=0.995))
    assert ids(reliable) == ["21001", "21003"]
    fast = await vast_provider.search_offers(spec, OfferFilters(min_inet_down_mbps=1000))
    assert ids(fast) == ["21003"]
    # a looser filter does not undo the provider's own floor (0.98)
    loose = await vast_provider.search_offers(spec, OfferFilters(min_reliability=0.5))
    assert "21004" not in ids(loose)


async def test_floors_can_be_turned_off(vast_emulator: EmulatorServer) -> None:
    provider = make_provider(
        vast_emulator,
        min_reliability=None,
        verified_only=False,
        direct_ssh=False,
        min_inet_down_mbps=None,
        min_cuda=None,
        disk_gb=10,
    )
    got = ids(await provider.search_offers(parse_gpu_spec("1x3090")))
    assert {f"2100{i}" for i in range(1, 10)} <= set(got)
    assert got[:2] == ["21004", "21005"]  # 0.09/0.90 = 0.100 < 0.10/0.995 = 0.1005


async def test_gpu_names_counts_and_memory(vast_provider: VastProvider) -> None:
    four = await vast_provider.search_offers(parse_gpu_spec("4x3090"))
    assert ids(four) == ["21010", "21011"]  # the 8x machine costs more in total
    big = await vast_provider.search_offers(parse_gpu_spec("1xA100-80GB"))
    assert ids(big) == ["21041", "21042"] and {o.gpu_name for o in big} == {"A100"}
    assert big[0].gpu_memory_gb == 80.0 and big[0].extra["vast_gpu_name"] == "A100 SXM4"
    any_a100 = await vast_provider.search_offers(parse_gpu_spec("1xA100"))
    assert ids(any_a100) == ["21040", "21041", "21042"]
    h100 = await vast_provider.search_offers(parse_gpu_spec("2xH100"))
    assert ids(h100) == ["21051"]
    v100 = await vast_provider.search_offers(parse_gpu_spec("V100"))
    assert ids(v100) == ["21060"] and v100[0].gpu_name == "V100"
    assert await vast_provider.search_offers(parse_gpu_spec("16x3090")) == []
    assert [vast_gpu_model(n) for n in ("H100 SXM", "RTX 6000Ada", "Tesla T4", "RTX 3090", "A100X", None)] == [
        "H100",
        "RTX 6000 Ada",
        "T4",
        "RTX 3090",
        "A100",
        None,
    ]


def test_state_mapping() -> None:
    def s(**row: object) -> str:
        return vast_state(row).value

    assert vast_state(None).value == "gone"
    assert s(actual_status="running", intended_status="running") == "running"
    assert s(actual_status="loading", intended_status="running") == "loading"
    assert s(actual_status=None, intended_status="running", cur_state="stopped") == "loading"
    assert s(actual_status="created", intended_status="running") == "loading"
    assert s(actual_status="created", intended_status="running", status_msg="OCI runtime create failed") == "exited"
    assert s(actual_status="exited", intended_status="stopped") == "exited"
    assert s(actual_status="running", intended_status="stopped") == "exited"  # being stopped
    assert s(actual_status="offline", intended_status="running") == "offline"
    assert s(actual_status="frobnicating", intended_status="running") == "unknown"


async def test_interruptible_offers_and_bids(
    vast_emulator: EmulatorServer, run_key: KeyPair, labels: dict[str, str]
) -> None:
    provider = make_provider(vast_emulator, interruptible=True)
    offers = await provider.search_offers(parse_gpu_spec("1x3090"))
    best = offers[0]
    assert best.offer_id == "21002"
    assert best.price_per_hour == pytest.approx(round(0.19 * 0.45, 4) + 0.15 * 40 / 720, abs=1e-6)
    # a bid under the offer's minimum is refused before anything is rented
    low = InstanceRequest(ssh_public_key=run_key.public_key, labels=labels, bid_price=0.01)
    with pytest.raises(ProvisioningFailed, match="minimum bid"):
        await provider.create_instance(best, low)
    assert vast_emulator.emulator.stats["create:ok"] == 0
    # the emulator refuses an underbid the same way when the provider did not know the minimum
    blind = best.model_copy(update={"extra": {**best.extra, "min_bid": None}})
    with pytest.raises(ProvisioningFailed, match="invalid_price"):
        await provider.create_instance(blind, low)
    assert vast_emulator.emulator.instances == {}


@pytest.mark.slow
async def test_interruptible_instance_rents_at_the_bid(
    vast_emulator: EmulatorServer, run_key: KeyPair, labels: dict[str, str]
) -> None:
    provider = make_provider(vast_emulator, interruptible=True)
    best = (await provider.search_offers(parse_gpu_spec("1x3090")))[0]
    request = InstanceRequest(
        ssh_public_key=run_key.public_key,
        labels=labels,
        image="example/train:1",
        disk_gb=50,
        env={"CHOLINE_X": "1"},
        start_command="true",
    )
    instance_id = await provider.create_instance(best, request)
    try:
        row = vast_emulator.emulator.row(vast_emulator.emulator.instances[int(instance_id)])
        assert row["is_bid"] is True
        assert row["dph_total"] == pytest.approx(best.extra["min_bid"] + 0.15 * 50 / 720, abs=1e-6)
        # what the request asked for reached vast.ai
        assert row["image_uuid"] == "example/train:1" and row["disk_space"] == 50
        assert row["extra_env"] == [["CHOLINE_X", "1"]] and row["onstart"] == "true"
        (listed,) = await provider.list_instances(labels)
        assert listed.instance_id == instance_id and listed.host_id == "5002" and listed.offer_id == "21002"
        assert listed.labels["choline.run"] == "run-test" and "choline.request" in listed.labels
        # the run's key is attached to the instance
        assert run_key.public_key.split()[1] in " ".join(vast_emulator.emulator.instances[int(instance_id)].keys)
    finally:
        await provider.destroy_instance(instance_id)
    await assert_clean(provider, vast_emulator.emulator, labels)


async def test_a_vanished_offer_is_no_capacity(
    vast_emulator: EmulatorServer, vast_provider: VastProvider, run_key: KeyPair, labels: dict[str, str]
) -> None:
    offer = (await vast_provider.search_offers(parse_gpu_spec("1x3090")))[0]
    vast_emulator.emulator.remove_offer(int(offer.offer_id))  # taken off the market meanwhile
    with pytest.raises(NoCapacity, match="not available"):
        await vast_provider.create_instance(offer, InstanceRequest(ssh_public_key=run_key.public_key, labels=labels))
    await assert_clean(vast_provider, vast_emulator.emulator, labels)


async def test_keys(vast_emulator: EmulatorServer, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = VastProvider(api_key="not-the-key-000000", server_url=vast_emulator.url, backoff_s=0.01)
    with pytest.raises(Unauthorized, match="refused the API key"):
        await wrong.search_offers(parse_gpu_spec("1x3090"))
    # no key anywhere: a clear error naming the setting
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    with pytest.raises(Unauthorized, match=r"no vast\.ai API key") as info:
        VastProvider(server_url=vast_emulator.url)
    assert "CHOLINE_VAST_API_KEY" in (info.value.hint or "")
    # the registry builds it with the provisioner's options; the key never shows in its repr
    provider = get_provider("vast", api_key=API_KEY, server_url=vast_emulator.url + "/")
    assert isinstance(provider, VastProvider) and API_KEY not in repr(provider)
    assert provider.server_url == vast_emulator.url
    assert ids(await provider.search_offers(parse_gpu_spec("1x3090")))[0] == "21002"


async def test_unreachable_api_is_retryable(tmp_path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    provider = VastProvider(api_key=API_KEY, server_url=f"http://127.0.0.1:{port}", backoff_s=0.01, max_attempts=2)
    with pytest.raises(VastUnavailable, match="ConnectionError"):
        await provider.search_offers(parse_gpu_spec("1x3090"))
