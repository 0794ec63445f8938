"""The ssh provider: machines the user already has, reached over SSH with the user's own key.

Machines come from ``$CHOLINE_HOME/machines.toml`` (or ``machines.json``, same shape)::

    [machines.lab]
    host = "192.168.1.20"
    user = "alice"
    key = "~/.ssh/id_ed25519"
    gpus = "2x3090"        # optional: otherwise nvidia-smi is asked at search time
    price_per_hour = 0.0   # optional: what the machine costs you, for cost tracking

Each machine is one offer (while it has fewer than ``max_instances`` choline instances on it).
An instance is a folder ``<workdir>/<instance id>/`` on the machine holding
``.choline-instance.json`` (labels, env, creation time); the instance is "running" while the
folder exists. Every command choline runs there exports ``CHOLINE_SSH_INSTANCE=<instance id>`` (through
``SshEndpoint.env``), which is how destroy finds choline's processes: it stops every process of
the login user whose environment carries that marker (TERM, then KILL after a grace period) and
deletes the folder. It never touches anything else and never powers anything off.

The machine's host key is pinned at first contact (or given as ``host_key``), like any box.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import secrets
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from choline_core.errors import BadSpec, NoCapacity, ProvisioningFailed, UserError
from choline_core.settings import choline_home
from choline_core.specs import GPU_MODELS, GpuSpec, parse_gpu_spec

from ..sshclient import SshConnection, SshError, SshUnreachable, shell_path
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

log = logging.getLogger(__name__)

META = ".choline-instance.json"
BOX_MARKER = "CHOLINE_SSH_INSTANCE"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]{0,62}$")
_ID_RE = re.compile(r"^(?P<machine>[A-Za-z0-9][A-Za-z0-9_.]{0,62})-(?P<token>[0-9a-f]{12})$")


class Machine(BaseModel):
    """One machine of the user's, as written in machines.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME_RE.pattern)
    host: str
    port: int = Field(default=22, ge=1, le=65535)
    user: str
    key: str
    gpus: str | None = None
    price_per_hour: float = Field(default=0.0, ge=0)
    reliability: float = Field(default=1.0, ge=0, le=1)
    inet_down_mbps: float | None = Field(default=None, ge=0)
    workdir: str = "~/.choline-boxes"
    max_instances: int = Field(default=1, ge=1)
    host_key: str | None = None
    location: str | None = None

    def endpoint(self) -> SshEndpoint:
        """How choline logs in to the machine itself (not to an instance on it)."""
        return SshEndpoint(host=self.host, port=self.port, user=self.user, key_path=self.key, host_key=self.host_key)

    def instance_dir(self, instance_id: str) -> str:
        return f"{self.workdir.rstrip('/')}/{instance_id}"


def load_machines(home: Path | None = None) -> dict[str, Machine]:
    """The machines in ``machines.toml`` or ``machines.json`` under ``home``; {} when neither exists.

    A malformed file is a ``UserError`` naming the file and the problem.
    """
    base = home or choline_home()
    for name in ("machines.toml", "machines.json"):
        path = base / name
        if not path.exists():
            continue
        try:
            raw = tomllib.loads(path.read_text()) if name.endswith(".toml") else json.loads(path.read_text())
        except (ValueError, OSError) as exc:
            raise UserError(f"cannot read {path}: {exc}", hint="see docs/providers.md for the format") from None
        return parse_machines(raw, source=str(path))
    return {}


def parse_machines(raw: Any, *, source: str = "machines config") -> dict[str, Machine]:
    """``{"machines": {NAME: {host, user, key, ...}}}`` -> machines by name."""
    if not isinstance(raw, dict) or not isinstance(raw.get("machines", {}), dict):
        raise UserError(f"{source}: expected a [machines.NAME] table per machine", hint="see docs/providers.md")
    out: dict[str, Machine] = {}
    for name, fields in raw.get("machines", {}).items():
        if not isinstance(fields, dict):
            raise UserError(f"{source}: machine {name!r} must be a table of settings")
        try:
            machine = Machine(name=name, **fields)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise UserError(f"{source}: machine {name!r}: {problems}", hint="see docs/providers.md") from None
        if machine.gpus:
            try:
                parse_gpu_spec(machine.gpus)
            except BadSpec as exc:
                raise UserError(f"{source}: machine {name!r}: gpus: {exc.message}") from None
        out[name] = machine
    return out


def _gpus_from_spec(text: str) -> list[tuple[str, float]]:
    spec = parse_gpu_spec(text)
    if spec.is_cpu or spec.model is None:
        return []
    memory = spec.memory_gb or GPU_MODELS[spec.model][1]
    return [(spec.model, float(memory))] * spec.count


_PROBE = r"""
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits 2>/dev/null || true
echo @@DISK
df -Pk {workdir_parent} 2>/dev/null | tail -n 1
echo @@BOXES
for f in {workdir}/*/{meta}; do [ -f "$f" ] && echo "$f"; done
true
"""

_STOP = r"""
ID={id}
D={dir}
marked() {{
  if grep -qz x /dev/null 2>/dev/null; [ $? -ne 2 ]; then
    grep -lzxF "{marker}=$ID" /proc/[0-9]*/environ 2>/dev/null | sed 's#^/proc/\([0-9]*\)/environ$#\1#'
  else
    for p in /proc/[0-9]*; do
      if tr '\000' '\n' < "$p/environ" 2>/dev/null | grep -qx "{marker}=$ID"; then echo "${{p#/proc/}}"; fi
    done
  fi
}}
pids=$(marked)
if [ -n "$pids" ]; then
  kill -TERM $pids 2>/dev/null
  i=0
  while [ $i -lt {grace_ticks} ]; do
    pids=$(marked); [ -z "$pids" ] && break
    sleep 0.1; i=$((i+1))
  done
  pids=$(marked)
  if [ -n "$pids" ]; then
    kill -KILL $pids 2>/dev/null
    i=0
    while [ $i -lt 50 ] && [ -n "$(marked)" ]; do sleep 0.1; i=$((i+1)); done
  fi
fi
rm -rf "$D"
echo stopped
"""


class SshProvider(Provider):
    """The user's own machines. ``machines`` overrides the config file (tests, settings)."""

    name: ClassVar[str] = "ssh"

    def __init__(
        self,
        *,
        home: Path | None = None,
        machines: Mapping[str, Machine] | list[Machine] | None = None,
        connect_timeout: float = 10.0,
        stop_grace: float = 5.0,
    ) -> None:
        self.home = home or choline_home()
        if machines is None:
            self.machines = load_machines(self.home)
        elif isinstance(machines, list):
            self.machines = {m.name: m for m in machines}
        else:
            self.machines = dict(machines)
        self.connect_timeout = connect_timeout
        self.stop_grace = stop_grace

    async def _connect(self, machine: Machine) -> SshConnection:
        return await SshConnection.open(machine.endpoint(), None, connect_timeout=self.connect_timeout)

    def _split(self, instance_id: str) -> tuple[Machine, str] | None:
        m = _ID_RE.match(instance_id)
        if not m or m["machine"] not in self.machines:
            return None
        return self.machines[m["machine"]], instance_id

    # -- offers --
    async def _probe(self, machine: Machine) -> tuple[list[tuple[str, float]], float | None, int]:
        parent = machine.workdir.rstrip("/").rsplit("/", 1)[0] if "/" in machine.workdir else "~"
        script = _PROBE.format(
            workdir=shell_path(machine.workdir.rstrip("/")), workdir_parent=shell_path(parent), meta=META
        )
        async with await self._connect(machine) as conn:
            res = await conn.run(script, timeout=30)
        smi, _, rest = res.stdout.partition("@@DISK")
        disk_line, _, boxes = rest.partition("@@BOXES")
        disk: float | None = None
        fields = disk_line.split()
        if len(fields) >= 4 and fields[3].isdigit():
            disk = round(int(fields[3]) * 1024 / 1e9, 1)
        gpus = _gpus_from_spec(machine.gpus) if machine.gpus else parse_nvidia_smi(smi)
        return gpus, disk, len([line for line in boxes.splitlines() if line.strip()])

    async def fetch_offers(self, spec: GpuSpec, filters: OfferFilters) -> list[Offer]:
        offers: list[Offer] = []
        for machine in self.machines.values():
            try:
                gpus, disk, used = await self._probe(machine)
            except SshError as exc:
                log.warning("machine %s left out of the offers: %s", machine.name, exc.message)
                continue
            if used >= machine.max_instances:
                continue
            offers += offers_from_gpus(
                gpus,
                provider=self.name,
                offer_id=machine.name,
                host_id=f"ssh:{machine.name}",
                price_per_hour=machine.price_per_hour,
                reliability=machine.reliability,
                inet_down_mbps=machine.inet_down_mbps,
                disk_gb=disk,
                location=machine.location,
                extra={"machine": machine.name},
            )
        return offers

    # -- instances --
    async def create_instance(self, offer: Offer, request: InstanceRequest) -> str:
        machine_name = str(offer.extra.get("machine") or offer.offer_id)
        machine = self.machines.get(machine_name)
        if offer.provider != self.name or machine is None:
            raise NoCapacity(f"no configured machine {machine_name!r} for offer {offer.offer_id}")
        labels = check_labels(request.labels)
        instance_id = f"{machine.name}-{secrets.token_hex(6)}"
        folder = machine.instance_dir(instance_id)
        meta = {
            "instance_id": instance_id,
            "machine": machine.name,
            "labels": labels,
            "env": request.env,
            "offer_id": offer.offer_id,
            "price_per_hour": offer.price_per_hour,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        }
        try:
            async with await self._connect(machine) as conn:
                count = await conn.run(
                    f"n=0; for f in {shell_path(machine.workdir.rstrip('/'))}/*/{META}; "
                    'do [ -f "$f" ] && n=$((n+1)); done; echo $n',
                    timeout=30,
                    check=True,
                )
                if int(count.stdout.strip() or 0) >= machine.max_instances:
                    raise NoCapacity(f"machine {machine.name} already runs {machine.max_instances} choline instance(s)")
                d = shell_path(folder)
                await conn.run(
                    f"umask 077 && mkdir -p {d} && cat > {d}/{META}.tmp && mv {d}/{META}.tmp {d}/{META}",
                    input=json.dumps(meta),
                    timeout=30,
                    check=True,
                )
                if request.start_command:
                    await conn.run(
                        f"nohup sh -c {shlex.quote(request.start_command)} > onstart.log 2>&1 < /dev/null &",
                        cwd=folder,
                        env={BOX_MARKER: instance_id, **request.env},
                        timeout=30,
                        check=True,
                    )
        except SshError as exc:
            raise ProvisioningFailed(f"cannot prepare an instance on {machine.name}: {exc.message}") from None
        return instance_id

    async def _meta(self, conn: SshConnection, machine: Machine, instance_id: str) -> dict[str, Any] | None:
        res = await conn.run(f"cat {shell_path(machine.instance_dir(instance_id))}/{META} 2>/dev/null", timeout=30)
        if res.exit_status != 0:
            return None
        try:
            data = json.loads(res.stdout)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    async def status(self, instance_id: str) -> InstanceState:
        found = self._split(instance_id)
        if found is None:
            return InstanceState.GONE
        machine, _ = found
        try:
            async with await self._connect(machine) as conn:
                meta = await self._meta(conn, machine, instance_id)
        except SshUnreachable:
            return InstanceState.OFFLINE
        return InstanceState.RUNNING if meta is not None else InstanceState.GONE

    async def ssh_endpoint(self, instance_id: str) -> SshEndpoint:
        found = self._split(instance_id)
        if found is None:
            raise InstanceUnavailable(f"ssh instance {instance_id} is gone (no such machine configured)")
        machine, _ = found
        try:
            async with await self._connect(machine) as conn:
                meta = await self._meta(conn, machine, instance_id)
        except SshUnreachable as exc:
            raise InstanceUnavailable(f"machine {machine.name} cannot be reached: {exc.message}") from None
        if meta is None:
            raise InstanceUnavailable(f"ssh instance {instance_id} is gone")
        env = {str(k): str(v) for k, v in (meta.get("env") or {}).items()}
        return machine.endpoint().model_copy(
            update={"workdir": machine.instance_dir(instance_id), "env": {**env, BOX_MARKER: instance_id}}
        )

    async def destroy_instance(self, instance_id: str) -> None:
        found = self._split(instance_id)
        if found is None:
            return
        machine, _ = found
        script = _STOP.format(
            id=instance_id,
            dir=shell_path(machine.instance_dir(instance_id)),
            marker=BOX_MARKER,
            grace_ticks=max(1, int(self.stop_grace * 10)),
        )
        async with await self._connect(machine) as conn:
            await conn.run(script, timeout=self.stop_grace + 30, check=True)

    async def list_instances(self, labels: Mapping[str, str]) -> list[Instance]:
        want = check_labels(labels)
        out: list[Instance] = []
        for machine in self.machines.values():
            script = (
                f"for f in {shell_path(machine.workdir.rstrip('/'))}/*/{META}; "
                'do [ -f "$f" ] && { cat "$f"; echo; echo @@END; }; done; true'
            )
            try:
                async with await self._connect(machine) as conn:
                    res = await conn.run(script, timeout=30)
            except SshError as exc:
                log.warning("cannot list instances on machine %s: %s", machine.name, exc.message)
                continue
            for chunk in res.stdout.split("@@END"):
                try:
                    meta = json.loads(chunk)
                except ValueError:
                    continue
                if not isinstance(meta, dict) or not labels_match(meta.get("labels") or {}, want):
                    continue
                if not _ID_RE.match(str(meta.get("instance_id", ""))):
                    continue
                out.append(
                    Instance(
                        provider=self.name,
                        instance_id=meta["instance_id"],
                        state=InstanceState.RUNNING,
                        labels=meta.get("labels") or {},
                        offer_id=meta.get("offer_id"),
                        host_id=f"ssh:{machine.name}",
                        price_per_hour=meta.get("price_per_hour"),
                        created_at=meta.get("created_at"),
                    )
                )
        return out
