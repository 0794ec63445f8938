"""The provider contract: one suite every provider passes (local and ssh now, vast later).

Subclass ``ProviderContract`` as ``TestXxxContract`` and provide the fixture ``provider``;
override the class attributes where the provider differs. Instances run for real (local
boxes, the user's machine stood in by a box, the vast emulator) and are destroyed by the tests.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from choline_core.errors import Bug
from choline_core.specs import parse_gpu_spec
from choline_provisioner.providers import (
    LABEL_INSTALLATION,
    LABEL_RUN,
    InstanceRequest,
    InstanceState,
    InstanceUnavailable,
    OfferFilters,
    Provider,
    offer_rejection,
    offer_score,
)
from choline_provisioner.providers.localbox import process_alive
from choline_provisioner.sshclient import KeyPair, SshConnection, SshError


class ProviderContract:
    spec = "cpu"  # a spec the provider under test can satisfy
    impossible_spec = "16xB200"  # a spec it cannot
    unknown_instance_id = "no-such-instance"
    boot_timeout = 30.0

    @pytest.fixture
    def provider(self) -> Provider:
        raise NotImplementedError("subclasses provide the provider under test")

    def pid_alive(self, pid: int) -> bool:
        """Whether a process the instance ran is still alive (the box processes are local here)."""
        return process_alive(pid)

    async def test_offers_qualify_and_are_ranked(self, provider: Provider) -> None:
        spec = parse_gpu_spec(self.spec)
        offers = await provider.search_offers(spec)
        assert offers, f"{provider.name} offers nothing for {self.spec}"
        for offer in offers:
            assert offer.provider == provider.name
            assert offer.offer_id and offer.host_id
            assert offer.price_per_hour >= 0 and 0 <= offer.reliability <= 1
            assert offer_rejection(offer, spec) is None
        scores = [offer_score(o, spec) for o in offers]
        assert scores == sorted(scores)
        assert await provider.search_offers(parse_gpu_spec(self.impossible_spec)) == []
        # a floor nothing meets and a host exclusion both empty the list
        assert await provider.search_offers(spec, OfferFilters(min_disk_gb=1e12)) == []
        excluded = OfferFilters(exclude_hosts=frozenset(o.host_id for o in offers))
        assert await provider.search_offers(spec, excluded) == []

    async def test_unknown_instance(self, provider: Provider) -> None:
        assert await provider.status(self.unknown_instance_id) is InstanceState.GONE
        await provider.destroy_instance(self.unknown_instance_id)  # not an error
        with pytest.raises(InstanceUnavailable):
            await provider.ssh_endpoint(self.unknown_instance_id)

    async def test_installation_label_is_required(self, provider: Provider, run_key: KeyPair) -> None:
        with pytest.raises(Bug):
            InstanceRequest(ssh_public_key=run_key.public_key, labels={LABEL_RUN: "r"})
        with pytest.raises(Bug):
            await provider.list_instances({LABEL_RUN: "r"})

    @pytest.mark.slow
    async def test_lifecycle(self, provider: Provider, run_key: KeyPair, labels: dict[str, str]) -> None:
        offer = (await provider.search_offers(parse_gpu_spec(self.spec)))[0]
        request = InstanceRequest(
            ssh_public_key=run_key.public_key,
            labels=labels,
            env={"CHOLINE_TEST_GREETING": "hello from the box"},
            start_command='echo "$CHOLINE_TEST_GREETING" > started.txt',
        )
        instance_id = await provider.create_instance(offer, request)
        try:
            assert await provider.status(instance_id) in (InstanceState.LOADING, InstanceState.RUNNING)
            endpoint = await provider.wait_until_running(instance_id, timeout=self.boot_timeout)
            assert await provider.status(instance_id) is InstanceState.RUNNING

            async with await SshConnection.open(endpoint, run_key) as conn:
                res = await conn.run("echo ok; echo oops >&2; exit 7")
                assert (res.exit_status, res.stdout, res.stderr) == (7, "ok\n", "oops\n")
                # the start command ran once, detached, with the request's env, in the workdir
                deadline = time.monotonic() + 10
                while (res := await conn.run("cat started.txt")).stdout != "hello from the box\n":
                    assert time.monotonic() < deadline, res
                    await asyncio.sleep(0.1)
                # something the instance runs in the background dies with it
                bg = await conn.run("nohup sleep 300 > /dev/null 2>&1 < /dev/null & echo $!", check=True)
                bg_pid = int(bg.stdout.strip())
                assert self.pid_alive(bg_pid)

            listed = await provider.list_instances({LABEL_INSTALLATION: labels[LABEL_INSTALLATION]})
            mine = [i for i in listed if i.instance_id == instance_id]
            assert len(mine) == 1 and mine[0].state is InstanceState.RUNNING
            assert mine[0].labels[LABEL_RUN] == labels[LABEL_RUN] and mine[0].provider == provider.name
            others = await provider.list_instances({LABEL_INSTALLATION: "someone-else"})
            assert instance_id not in [i.instance_id for i in others]
            narrower = await provider.list_instances({**labels, LABEL_RUN: "another-run"})
            assert instance_id not in [i.instance_id for i in narrower]
        finally:
            await provider.destroy_instance(instance_id)

        assert await provider.status(instance_id) is InstanceState.GONE
        await provider.destroy_instance(instance_id)  # idempotent
        listed = await provider.list_instances({LABEL_INSTALLATION: labels[LABEL_INSTALLATION]})
        assert instance_id not in [i.instance_id for i in listed]
        with pytest.raises(InstanceUnavailable):
            await provider.ssh_endpoint(instance_id)
        deadline = time.monotonic() + 10
        while self.pid_alive(bg_pid):
            assert time.monotonic() < deadline, "a process of the destroyed instance survived"
            await asyncio.sleep(0.05)
        # an endpoint kept from before no longer leads anywhere usable
        with pytest.raises(SshError):
            async with await SshConnection.open(endpoint, run_key, connect_timeout=3) as conn:
                await conn.run("cat started.txt", check=True)
