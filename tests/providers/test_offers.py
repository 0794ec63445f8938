"""Offer ranking and floors, label encoding, the registry: pure functions, no servers."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from choline_core.errors import BadSpec, BadUsage, Bug
from choline_core.specs import parse_gpu_spec
from choline_provisioner.providers import (
    LABEL_INSTALLATION,
    InstanceRequest,
    Offer,
    OfferFilters,
    decode_labels,
    encode_labels,
    get_provider,
    offer_rejection,
    provider_names,
    rank_offers,
    search_offers,
)
from choline_provisioner.providers.local import LocalProvider
from choline_provisioner.providers.offers import gpu_model_name, offers_from_gpus, parse_nvidia_smi


def offer(oid: str, gpu: str | None = "RTX 3090", n: int = 4, mem: float = 24, price: float = 1.0, **kw) -> Offer:
    fields = {"reliability": 0.99, "inet_down_mbps": 500.0, "disk_gb": 100.0, **kw}
    return Offer(
        provider="test",
        offer_id=oid,
        host_id=fields.pop("host_id", f"h-{oid}"),
        gpu_name=gpu,
        gpu_count=n if gpu else 0,
        gpu_memory_gb=mem if gpu else 0,
        price_per_hour=price,
        **fields,
    )


def ids(offers: list[Offer]) -> list[str]:
    return [o.offer_id for o in offers]


def test_cheaper_per_requested_gpu_hour_wins() -> None:
    spec = parse_gpu_spec("4x3090")
    offers = [offer("a", price=1.6), offer("b", price=1.2), offer("c", price=1.4)]
    assert ids(rank_offers(offers, spec)) == ["b", "c", "a"]


def test_reliability_weighs_on_price() -> None:
    spec = parse_gpu_spec("1x3090")
    flaky = offer("flaky", n=1, price=0.20, reliability=0.80)  # 0.25 per delivered hour
    solid = offer("solid", n=1, price=0.22, reliability=0.99)  # 0.222
    assert ids(rank_offers([flaky, solid], spec)) == ["solid", "flaky"]


def test_a_bigger_machine_wins_only_when_cheaper_in_total() -> None:
    spec = parse_gpu_spec("4x3090")
    eight = offer("eight", n=8, price=2.0)  # 0.25 per GPU on the machine, but the run pays 2.0
    four = offer("four", n=4, price=1.2)
    assert ids(rank_offers([eight, four], spec)) == ["four", "eight"]
    assert eight.price_per_gpu_hour == pytest.approx(0.25)


def test_spec_selects_model_count_and_memory() -> None:
    offers = [
        offer("3090x4"),
        offer("3090x2", n=2),
        offer("4090x4", gpu="RTX 4090"),
        offer("a100-40", gpu="A100", n=1, mem=40),
        offer("a100-80", gpu="A100", n=1, mem=79.6),
        offer("cpu", gpu=None),
        offer("nvidia-name", gpu="NVIDIA GeForce RTX 3090", n=4),
    ]
    assert ids(rank_offers(offers, parse_gpu_spec("4x3090"))) == ["3090x4", "nvidia-name"]
    assert ids(rank_offers(offers, parse_gpu_spec("1xA100-80GB"))) == ["a100-80"]
    assert sorted(ids(rank_offers(offers, parse_gpu_spec("A100")))) == ["a100-40", "a100-80"]
    assert len(rank_offers(offers, parse_gpu_spec("cpu"))) == len(offers)  # any machine runs a CPU job
    assert "no GPUs" in (offer_rejection(offers[5], parse_gpu_spec("1x3090")) or "")


def test_floors_and_maximum_price() -> None:
    spec = parse_gpu_spec("4x3090")
    offers = [
        offer("ok"),
        offer("unreliable", reliability=0.9),
        offer("slow", inet_down_mbps=50.0),
        offer("small", disk_gb=20.0),
        offer("dear", price=9.0),
        offer("unknown-bw", inet_down_mbps=None),
        offer("lost", host_id="bad-host"),
    ]
    f = OfferFilters(
        min_reliability=0.98,
        min_inet_down_mbps=200,
        min_disk_gb=50,
        max_price_per_hour=5,
        exclude_hosts=frozenset({"bad-host"}),
    )
    assert ids(rank_offers(offers, spec, f)) == ["ok"]
    reasons = {o.offer_id: offer_rejection(o, spec, f) or "" for o in offers}
    assert "reliability" in reasons["unreliable"]
    assert "bandwidth" in reasons["slow"]
    assert "disk" in reasons["small"]
    assert "maximum" in reasons["dear"]
    assert "unknown" in reasons["unknown-bw"]  # a floor is a promise; unknown is not one
    assert "lost" in reasons["lost"]
    # without filters everything of the right hardware qualifies
    assert len(rank_offers(offers, spec)) == len(offers)


def test_ties_break_deterministically() -> None:
    spec = parse_gpu_spec("cpu")
    offers = [offer(f"o{i}", gpu=None, price=0.0, reliability=1.0, inet_down_mbps=100.0) for i in (3, 1, 2)]
    assert ids(rank_offers(offers, spec)) == ["o1", "o2", "o3"]
    better_net = offer("net", gpu=None, price=0.0, reliability=1.0, inet_down_mbps=900.0)
    assert ids(rank_offers([*offers, better_net], spec))[0] == "net"


def test_filters_reject_nonsense() -> None:
    with pytest.raises(ValidationError):
        OfferFilters(min_reliability=1.5)
    with pytest.raises(ValidationError):
        OfferFilters(max_price_per_hour=-1)
    with pytest.raises(ValidationError):
        OfferFilters(min_disk=10)  # type: ignore[call-arg]  # a typo is an error, not ignored


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("NVIDIA GeForce RTX 3090", "RTX 3090"),
        ("A100-SXM4-80GB", "A100"),
        ("H100 NVL", "H100"),
        ("Tesla V100-SXM2-16GB", "V100"),
        ("NVIDIA RTX A6000", "RTX A6000"),
        ("RTX 4090", "RTX 4090"),
        ("GH200", None),
    ],
)
def test_gpu_names_as_drivers_write_them(name: str, model: str | None) -> None:
    assert gpu_model_name(name) == model


def test_parse_nvidia_smi() -> None:
    text = "NVIDIA GeForce RTX 3090, 24576\nNVIDIA GeForce RTX 3090, 24576\nNVIDIA A100-SXM4-80GB, 81920\n"
    assert parse_nvidia_smi(text) == [("RTX 3090", 24.0), ("RTX 3090", 24.0), ("A100", 80.0)]
    assert parse_nvidia_smi("No devices were found\n") == []
    assert parse_nvidia_smi("Weird GPU X, [N/A]\n") == []
    assert parse_nvidia_smi("Some Future GPU, 16384\n") == [("Some Future GPU", 16.0)]
    offers = offers_from_gpus(
        parse_nvidia_smi(text), provider="local", offer_id="local", host_id="h", price_per_hour=0.0
    )
    assert [(o.gpu_name, o.gpu_count, o.gpu_memory_gb) for o in offers] == [("A100", 1, 80.0), ("RTX 3090", 2, 24.0)]
    assert [o.offer_id for o in offers] == ["local-0", "local-1"]
    cpu = offers_from_gpus([], provider="local", offer_id="local", host_id="h", price_per_hour=0.0)
    assert len(cpu) == 1 and cpu[0].is_cpu and cpu[0].machine == "1xcpu"


def test_labels_encode_and_decode() -> None:
    labels = {LABEL_INSTALLATION: "inst-1", "choline.run": "run-42", "choline.box": "b:1/x"}
    text = encode_labels(labels)
    assert text == "choline.box=b:1/x,choline.installation=inst-1,choline.run=run-42"
    assert decode_labels(text) == labels
    assert decode_labels("somebody's own label") == {}
    assert decode_labels(None) == {}
    with pytest.raises(Bug):
        encode_labels({"bad key": "v"})
    with pytest.raises(Bug):
        encode_labels({"k": "a,b=c"})


def test_instance_request_validation() -> None:
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBv2 run-1"
    ok = InstanceRequest(ssh_public_key=key + "\n", labels={LABEL_INSTALLATION: "i"})
    assert ok.ssh_public_key == key
    with pytest.raises(ValidationError):
        InstanceRequest(ssh_public_key="-----BEGIN OPENSSH PRIVATE KEY-----\nabc", labels={LABEL_INSTALLATION: "i"})
    with pytest.raises(ValidationError):
        InstanceRequest(ssh_public_key=key, labels={LABEL_INSTALLATION: "i"}, env={"not a name": "x"})
    with pytest.raises(ValidationError):
        InstanceRequest(ssh_public_key=key, labels={LABEL_INSTALLATION: "i"}, disk=10)  # type: ignore[call-arg]


async def test_registry() -> None:
    assert {"local", "ssh", "vast"} <= set(provider_names())
    assert isinstance(get_provider("local"), LocalProvider)
    with pytest.raises(BadUsage, match="unknown provider"):
        get_provider("nimbus")
    offers = await search_offers("local", "1xcpu")
    assert len(offers) == 1 and offers[0].provider == "local" and offers[0].price_per_hour == 0
    with pytest.raises(BadSpec):
        await search_offers("local", "4xbanana")
