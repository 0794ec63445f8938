"""The local provider: boxes are SSH servers on this machine (see ``localbox``).

The embedded default and the test bed for everything built on providers. A box lives in
``$CHOLINE_HOME/boxes/<box id>/`` (its HOME and working folder) and is served by a detached
process group, so boxes outlive a provisioner restart; destroy kills the group and deletes the
folder. Offers describe this machine: ``1xcpu``, or its GPUs when ``nvidia-smi`` lists some, at
price 0.

Every box shares one read-only base Python environment (torch and the agent's dependencies),
by default the interpreter choline runs in, overridable with ``base_python=`` or
``CHOLINE_LOCAL_BASE_PYTHON``; each box layers its own venv on it, so nothing is reinstalled.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import getpass
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from choline_core.errors import NotYetReady, ProvisioningFailed
from choline_core.settings import choline_home
from choline_core.specs import GpuSpec

from . import localbox
from .base import (
    Instance,
    InstanceRequest,
    InstanceState,
    InstanceUnavailable,
    Provider,
    SshEndpoint,
    check_labels,
    labels_match,
)
from .offers import Offer, OfferFilters, offers_from_gpus, parse_nvidia_smi

_BOX_ID_RE = re.compile(r"^box-[0-9a-f]{12}$")
META_FILE = "box.json"


def local_gpus(timeout: float = 10.0) -> list[tuple[str, float]]:
    """This machine's GPUs as ``nvidia-smi`` lists them; empty without one."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_nvidia_smi(out.stdout) if out.returncode == 0 else []


def _ram_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError, AttributeError):
        return None


class LocalProvider(Provider):
    """Boxes on this machine. ``home`` defaults to ``CHOLINE_HOME``."""

    name: ClassVar[str] = "local"

    def __init__(
        self,
        *,
        home: Path | None = None,
        base_python: str | None = None,
        user: str | None = None,
        python: str | None = None,
    ) -> None:
        self.home = home or choline_home()
        self.boxes_dir = self.home / "boxes"
        self.base_python = base_python or os.environ.get("CHOLINE_LOCAL_BASE_PYTHON") or sys.executable
        self.user = user or getpass.getuser()
        self.python = python or sys.executable
        self._gpus: list[tuple[str, float]] | None = None

    # -- offers --
    async def fetch_offers(self, spec: GpuSpec, filters: OfferFilters) -> list[Offer]:
        if self._gpus is None:
            self._gpus = await asyncio.to_thread(local_gpus)
        self.boxes_dir.mkdir(parents=True, exist_ok=True)
        disk = shutil.disk_usage(self.boxes_dir).free / 1e9
        return offers_from_gpus(
            self._gpus,
            provider=self.name,
            offer_id="local",
            host_id=f"local:{socket.gethostname()}",
            price_per_hour=0.0,
            reliability=1.0,
            disk_gb=round(disk, 1),
            cpu_cores=os.cpu_count(),
            ram_gb=_ram_gb(),
            location="local",
        )

    # -- instances --
    def _dir(self, instance_id: str) -> Path | None:
        return self.boxes_dir / instance_id if _BOX_ID_RE.match(instance_id) else None

    def box_dir(self, instance_id: str) -> Path:
        """The box's folder (its HOME); ``ValueError`` for an id that is not a local box id."""
        d = self._dir(instance_id)
        if d is None:
            raise ValueError(f"{instance_id!r} is not a local box id")
        return d

    async def create_instance(self, offer: Offer, request: InstanceRequest) -> str:
        if offer.provider != self.name:
            raise ProvisioningFailed(f"offer {offer.offer_id} is from {offer.provider}, not local")
        labels = check_labels(request.labels)
        box_id = f"box-{secrets.token_hex(6)}"
        d = self.boxes_dir / box_id
        ctl = localbox.control_dir(d)
        ctl.mkdir(parents=True, mode=0o700)
        d.chmod(0o700)
        meta = {
            "box_id": box_id,
            "labels": labels,
            "offer_id": offer.offer_id,
            "host_id": offer.host_id,
            "price_per_hour": offer.price_per_hour,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "user": self.user,
        }
        (ctl / META_FILE).write_text(json.dumps(meta, indent=1))
        localbox.generate_host_key(ctl / "host_key")
        try:
            await asyncio.to_thread(
                localbox.start_box,
                d,
                authorized_key=request.ssh_public_key,
                host_key=ctl / "host_key",
                user=self.user,
                base_python=self.base_python,
                env=request.env,
                start_command=request.start_command,
                python=self.python,
            )
        except OSError as exc:
            await asyncio.to_thread(localbox.remove_box, d)
            raise ProvisioningFailed(f"cannot start local box: {exc}") from None
        return box_id

    async def status(self, instance_id: str) -> InstanceState:
        d = self._dir(instance_id)
        if d is None or not (localbox.control_dir(d) / META_FILE).exists():
            return InstanceState.GONE
        return InstanceState(localbox.box_state(d))

    async def ssh_endpoint(self, instance_id: str) -> SshEndpoint:
        d = self._dir(instance_id)
        info = localbox.read_box(d) if d is not None else None
        if info is None or info.state == "gone" or not (localbox.control_dir(info.dir) / META_FILE).exists():
            raise InstanceUnavailable(f"local box {instance_id} is gone")
        if info.state == "loading":
            raise NotYetReady(f"local box {instance_id} is still starting")
        if info.state != "running" or info.port is None:
            raise InstanceUnavailable(f"local box {instance_id} is {info.state}: {info.message or ''}".strip())
        ctl = localbox.control_dir(info.dir)
        return SshEndpoint(
            host="127.0.0.1",
            port=info.port,
            user=info.user or self.user,
            workdir=str(info.dir),
            host_key=localbox.host_public_key(ctl / "host_key"),
            host_key_alias=f"local/{instance_id}",
        )

    async def destroy_instance(self, instance_id: str) -> None:
        d = self._dir(instance_id)
        if d is None or not d.exists():
            return
        await asyncio.to_thread(localbox.remove_box, d)

    async def kill(self, instance_id: str) -> None:
        """Make the box die as a machine dies (SIGKILL to its group); its folder stays and its
        state becomes ``offline``. For tests and the fault injector, not part of the interface."""
        d = self._dir(instance_id)
        if d is not None and d.exists():
            await asyncio.to_thread(localbox.kill_box, d)

    async def list_instances(self, labels: Mapping[str, str]) -> list[Instance]:
        want = check_labels(labels)
        out: list[Instance] = []
        if not self.boxes_dir.is_dir():
            return out
        for d in sorted(self.boxes_dir.iterdir()):
            if not _BOX_ID_RE.match(d.name):
                continue
            meta: dict[str, Any] = localbox.read_json(localbox.control_dir(d) / META_FILE)
            if not meta or not labels_match(meta.get("labels") or {}, want):
                continue
            info = localbox.read_box(d)
            if info.state == "gone":
                continue
            out.append(
                Instance(
                    provider=self.name,
                    instance_id=d.name,
                    state=InstanceState(info.state),
                    labels=meta.get("labels") or {},
                    offer_id=meta.get("offer_id"),
                    host_id=meta.get("host_id"),
                    price_per_hour=meta.get("price_per_hour"),
                    created_at=meta.get("created_at"),
                    pid=info.pid,
                    message=info.message,
                )
            )
        return out
