"""Fixtures for the provider tests: real local boxes (asyncssh servers on 127.0.0.1, free ports).

- ``run_key``          the run's key pair under this test's CHOLINE_HOME
- ``installation``     a fresh installation id; ``labels`` the labels a run's box carries
- ``local_provider``   a LocalProvider on this test's CHOLINE_HOME; every box it made is
                       removed at teardown, whatever the test did
- ``raw_box``          factory: start a bare box with ``localbox.start_box`` -> ``RawBox``
                       (dir, endpoint, pid); removed at teardown
- ``machine_box``      a box standing in for a user's own machine (``Machine`` + its box)
- ``ssh_provider``     an SshProvider whose one machine is ``machine_box``
"""

from __future__ import annotations

import getpass
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from choline_provisioner.providers import LABEL_INSTALLATION, LABEL_RUN, SshEndpoint, localbox
from choline_provisioner.providers.local import LocalProvider
from choline_provisioner.providers.ssh import Machine, SshProvider
from choline_provisioner.sshclient import KeyPair, ensure_run_key


@pytest.fixture
def run_key(choline_home: Path) -> KeyPair:
    return ensure_run_key("run-test")


@pytest.fixture
def installation() -> str:
    return f"inst-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def labels(installation: str) -> dict[str, str]:
    return {LABEL_INSTALLATION: installation, LABEL_RUN: "run-test"}


@pytest.fixture
async def local_provider(choline_home: Path) -> AsyncIterator[LocalProvider]:
    provider = LocalProvider(home=choline_home)
    yield provider
    await provider.close()
    if provider.boxes_dir.is_dir():
        for d in provider.boxes_dir.iterdir():
            localbox.remove_box(d)


@dataclass
class RawBox:
    dir: Path
    pid: int
    endpoint: SshEndpoint


def wait_ready(box_dir: Path, timeout: float = 30.0) -> localbox.BoxInfo:
    deadline = time.monotonic() + timeout
    while True:
        info = localbox.read_box(box_dir)
        if info.state == "running":
            return info
        assert info.state == "loading", f"box {box_dir} is {info.state}: {info.message}"
        assert time.monotonic() < deadline, f"box {box_dir} not ready after {timeout}s"
        time.sleep(0.02)


@pytest.fixture
def raw_box(tmp_path: Path) -> Iterator[Callable[..., RawBox]]:
    made: list[Path] = []

    def start(key: KeyPair, *, name: str | None = None, alias: str | None = None, **options: object) -> RawBox:
        d = tmp_path / "raw-boxes" / (name or uuid.uuid4().hex[:8])
        options.setdefault("base_python", None)  # no venv: these tests are about SSH
        pid = localbox.start_box(d, authorized_key=key.public_key, **options)  # type: ignore[arg-type]
        made.append(d)
        info = wait_ready(d)
        assert info.port is not None
        endpoint = SshEndpoint(
            host="127.0.0.1",
            port=info.port,
            user=info.user or getpass.getuser(),
            workdir=str(d.resolve()),
            host_key_alias=alias or f"raw/{d.name}",
        )
        return RawBox(d.resolve(), pid, endpoint)

    yield start
    for d in made:
        localbox.remove_box(d)


@dataclass
class MachineBox:
    machine: Machine
    box: RawBox
    user_key: KeyPair


@pytest.fixture
def machine_box(raw_box: Callable[..., RawBox], choline_home: Path) -> MachineBox:
    """A local box standing in for the user's machine; the user's key is not a run key."""
    user_key = ensure_run_key("users-own-key", home=choline_home / "user-ssh")
    box = raw_box(user_key, name="lab")
    machine = Machine(
        name="lab",
        host="127.0.0.1",
        port=box.endpoint.port,
        user=box.endpoint.user,
        key=str(user_key.private_path),
        workdir="~/choline-boxes",
    )
    return MachineBox(machine, box, user_key)


@pytest.fixture
async def ssh_provider(machine_box: MachineBox, choline_home: Path) -> AsyncIterator[SshProvider]:
    provider = SshProvider(home=choline_home, machines=[machine_box.machine], stop_grace=2.0)
    yield provider
    await provider.close()
