"""The ssh provider (the user's own machines), against a local box standing in for a machine."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from choline_core.errors import NoCapacity, UserError
from choline_core.specs import parse_gpu_spec
from choline_provisioner.providers import (
    InstanceRequest,
    InstanceState,
    InstanceUnavailable,
    Provider,
    localbox,
)
from choline_provisioner.providers.ssh import SshProvider, load_machines, parse_machines
from choline_provisioner.sshclient import KeyPair, SshConnection, SshUnreachable

from .conftest import MachineBox
from .contract import ProviderContract


class TestSshContract(ProviderContract):
    unknown_instance_id = "lab-000000000000"

    @pytest.fixture
    def provider(self, ssh_provider: SshProvider) -> Provider:
        return ssh_provider


async def test_machines_config(choline_home: Path) -> None:
    assert load_machines() == {}
    (choline_home / "machines.toml").write_text(
        textwrap.dedent(
            """
            [machines.lab]
            host = "192.168.1.20"
            user = "alice"
            key = "~/.ssh/id_ed25519"
            gpus = "2x3090"
            price_per_hour = 0.12

            [machines.attic]
            host = "attic.local"
            port = 2222
            user = "bob"
            key = "/keys/attic"
            """
        )
    )
    machines = load_machines()
    assert set(machines) == {"lab", "attic"}
    assert machines["lab"].port == 22 and machines["lab"].price_per_hour == 0.12
    assert machines["attic"].endpoint().pin_name == "[attic.local]:2222"
    assert set(SshProvider().machines) == {"lab", "attic"}  # read from CHOLINE_HOME by default

    (choline_home / "machines.toml").write_text('[machines.lab]\nhost = "h"\nuser = "u"\nkey = "k"\nprot = 22\n')
    with pytest.raises(UserError, match=r"machine 'lab': prot: Extra inputs"):
        load_machines()
    (choline_home / "machines.toml").write_text('[machines.lab]\nhost = "h"\nuser = "u"\n')
    with pytest.raises(UserError, match="key: Field required"):
        load_machines()
    (choline_home / "machines.toml").write_text(
        '[machines.lab]\nhost = "h"\nuser = "u"\nkey = "k"\ngpus = "4xbanana"\n'
    )
    with pytest.raises(UserError, match="gpus: unknown GPU model"):
        load_machines()
    (choline_home / "machines.toml").write_text("[machines.lab\n")
    with pytest.raises(UserError, match="cannot read"):
        load_machines()
    (choline_home / "machines.toml").unlink()
    (choline_home / "machines.json").write_text(
        json.dumps({"machines": {"box": {"host": "h", "user": "u", "key": "k"}}})
    )
    assert list(load_machines()) == ["box"]
    with pytest.raises(UserError, match="expected a"):
        parse_machines({"machines": ["not", "a", "table"]})


async def test_configured_gpus_capacity_and_an_unreachable_machine(
    machine_box: MachineBox, choline_home: Path, run_key: KeyPair, labels: dict[str, str]
) -> None:
    gpu_machine = machine_box.machine.model_copy(update={"gpus": "2x3090", "price_per_hour": 0.3})
    provider = SshProvider(home=choline_home, machines=[gpu_machine])
    (offer,) = await provider.search_offers(parse_gpu_spec("1x3090"))
    assert (offer.gpu_name, offer.gpu_count, offer.gpu_memory_gb, offer.price_per_hour) == ("RTX 3090", 2, 24, 0.3)
    assert offer.disk_gb and offer.disk_gb > 0  # asked on the machine
    assert await provider.search_offers(parse_gpu_spec("4x3090")) == []

    instance_id = await provider.create_instance(
        offer, InstanceRequest(ssh_public_key=run_key.public_key, labels=labels)
    )
    assert await provider.search_offers(parse_gpu_spec("1x3090")) == []  # max_instances = 1: it is busy
    with pytest.raises(NoCapacity):
        await provider.create_instance(offer, InstanceRequest(ssh_public_key=run_key.public_key, labels=labels))

    localbox.kill_box(machine_box.box.dir)  # the machine goes down
    assert await provider.status(instance_id) is InstanceState.OFFLINE
    assert await provider.search_offers(parse_gpu_spec("cpu")) == []  # left out, not an error
    assert await provider.list_instances(labels) == []
    with pytest.raises(InstanceUnavailable, match="cannot be reached"):
        await provider.ssh_endpoint(instance_id)
    with pytest.raises(SshUnreachable):  # destroy must be retried later, it is not "gone"
        await provider.destroy_instance(instance_id)


@pytest.mark.slow
async def test_destroy_stops_only_choline_processes(
    ssh_provider: SshProvider, machine_box: MachineBox, run_key: KeyPair, labels: dict[str, str]
) -> None:
    offer = (await ssh_provider.search_offers(parse_gpu_spec("cpu")))[0]
    instance_id = await ssh_provider.create_instance(
        offer, InstanceRequest(ssh_public_key=run_key.public_key, labels=labels, start_command="sleep 300")
    )
    endpoint = await ssh_provider.wait_until_running(instance_id, timeout=10)
    assert endpoint.key_path == machine_box.machine.key  # the user's own key, not the run's
    assert endpoint.workdir == f"~/choline-boxes/{instance_id}"
    async with await SshConnection.open(endpoint, None) as conn:
        ours = int((await conn.run("nohup sleep 301 > /dev/null 2>&1 < /dev/null & echo $!", check=True)).stdout)
        stubborn = int(
            (
                await conn.run(
                    "nohup sh -c 'trap \"\" TERM; sleep 302' > /dev/null 2>&1 < /dev/null & echo $!", check=True
                )
            ).stdout
        )
        where = (await conn.run("pwd", check=True)).stdout.strip()
    assert Path(where) == machine_box.box.dir / "choline-boxes" / instance_id
    # something of the user's on the same machine, not started through choline
    async with await SshConnection.open(machine_box.machine.endpoint(), None) as conn:
        theirs = int((await conn.run("nohup sleep 303 > /dev/null 2>&1 < /dev/null & echo $!", check=True)).stdout)
    started = [p for p in localbox.marked_processes("CHOLINE_SSH_INSTANCE", instance_id) if p not in (ours, stubborn)]
    assert started, "the start command runs, marked as the instance's"

    await ssh_provider.destroy_instance(instance_id)  # returns once they are gone
    for pid in (ours, stubborn, *started):
        assert not localbox.process_alive(pid), pid
    assert localbox.process_alive(theirs)  # never touched
    assert not (machine_box.box.dir / "choline-boxes" / instance_id).exists()
    assert localbox.box_state(machine_box.box.dir) == "running"  # nothing powered off
