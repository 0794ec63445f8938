"""The emulator's state: offers, instances backed by local boxes, SSH keys, faults, billing.

Thread-safe (one lock): the HTTP routes, the ticker and tests call it from different threads.
Instances are real local boxes (``choline_provisioner.providers.localbox``): an SSH server on
127.0.0.1 at a free port in ``<boxes_dir>/i<instance id>/``, started at create (unless a fault
says otherwise), killed when its host goes offline, stopped on ``state=stopped``, killed and
deleted on destroy. ``close()`` removes every box; a new emulator on the same boxes folder
first removes boxes an earlier emulator left behind (one killed before it could clean up).

States as vast.ai reports them (``actual_status``): ``loading`` (created, not up yet),
``running``, ``exited`` (stopped), ``offline`` (the host went away), and ``created`` with an
error in ``status_msg`` (the container never started).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from choline_provisioner.providers import localbox

from .catalog import QueryError, load_catalog, matches, order_rows, priced

log = logging.getLogger(__name__)

MARKER_FILE = "vast-emulator.json"
Outcome = Literal["ok", "reject", "boot_fail", "vanish", "stuck", "offline"]
OCI_ERROR = (
    "Error response from daemon: failed to create task for container: failed to create shim task: "
    "OCI runtime create failed: runc create failed: unable to start container process"
)


class Faults(BaseModel):
    """What goes wrong, and how often. Probabilities are per request (API errors) or per create.

    - ``error_rate``: an API call (not /admin) answers one of ``error_statuses`` instead, before
      doing anything; a 429 carries ``Retry-After: retry_after_s`` when set.
    - ``lost_reply_rate``: a create/stop/destroy/attach call is carried out, then answered 502
      (the reply was lost on the way): a client that simply retries a create rents twice.
    - ``create_fail_rate``: create is refused (``create_fail_mode="reject"``: HTTP 400
      ``create_failed``) or the instance is made but its container never starts
      (``"boot"``: ``actual_status=created`` with an OCI error after ``boot_delay_s``).
    - ``vanish_rate``: the offer was rented by someone else between search and create (404
      ``no_such_ask``; the offer is gone from searches).
    - ``stuck_rate``: the instance stays ``loading`` for ever (no box is started).
    - ``offline_rate``: the instance's host goes ``offline`` ``offline_after_s`` after it runs
      (its box is SIGKILLed, whatever it ran dies).
    - ``boot_delay_s``: how long every instance stays ``loading`` before ``running``.
    - ``next_create``: outcomes for the next creates, in order, before any probability is drawn
      (``ok``, ``reject``, ``boot_fail``, ``vanish``, ``stuck``, ``offline``): a test's script.
    - ``lose_replies``: routes (``create``, ``destroy``, ``attach``, ``manage``, ``keys``) whose
      next reply is lost, once per entry, before ``lost_reply_rate`` is drawn.
    - ``seed``: the random generator is re-seeded whenever faults are set.
    """

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    error_rate: float = Field(default=0.0, ge=0, le=1)
    error_statuses: list[int] = Field(default_factory=lambda: [429, 500, 502, 503])
    retry_after_s: float | None = Field(default=None, ge=0)
    lost_reply_rate: float = Field(default=0.0, ge=0, le=1)
    create_fail_rate: float = Field(default=0.0, ge=0, le=1)
    create_fail_mode: Literal["reject", "boot"] = "reject"
    vanish_rate: float = Field(default=0.0, ge=0, le=1)
    stuck_rate: float = Field(default=0.0, ge=0, le=1)
    offline_rate: float = Field(default=0.0, ge=0, le=1)
    offline_after_s: float = Field(default=5.0, ge=0)
    boot_delay_s: float = Field(default=0.0, ge=0)
    next_create: list[Outcome] = Field(default_factory=list)
    lose_replies: list[Literal["create", "destroy", "attach", "manage", "keys"]] = Field(default_factory=list)


class ApiError(Exception):
    """An answer of the vast API other than success: ``{"success": false, "error", "msg"}``."""

    def __init__(self, status: int, error: str, msg: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(msg)
        self.status = status
        self.error = error
        self.msg = msg
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"success": False, "error": self.error, "msg": self.msg}


@dataclass
class Instance:
    id: int
    ask: dict[str, Any]  # the offer as rented (priced)
    label: str | None
    image: str | None
    disk: float
    env: dict[str, str]
    onstart: str | None
    price: float
    is_bid: bool
    box_dir: Path
    outcome: Outcome
    created: float  # wall clock (start_date)
    ready_at: float  # monotonic: loading until then
    keys: list[str] = field(default_factory=list)
    intended: str = "running"
    offline: bool = False
    offline_after: float | None = None  # goes offline this long after it first runs
    running_since: float | None = None
    status_msg: str = ""
    box_started: bool = False
    destroyed_at: float | None = None


class Emulator:
    """vast.ai's state as one account sees it. See the module doc.

    ``boxes_dir``: where instance boxes live. ``base_python``: the shared base environment
    of boxes (``None``: no venv); ``ssh_user``: the login name boxes accept (vast.ai: root).
    """

    def __init__(
        self,
        boxes_dir: Path | str,
        *,
        offers: list[dict[str, Any]] | None = None,
        catalog: Path | str | None = None,
        faults: Faults | None = None,
        ssh_user: str = "root",
        base_python: str | None = sys.executable,
        python: str | None = None,
        first_instance_id: int = 8_000_001,
    ) -> None:
        self.boxes_dir = Path(boxes_dir).expanduser().resolve()
        self.boxes_dir.mkdir(parents=True, exist_ok=True)
        self.offers: dict[int, dict[str, Any]] = {
            int(o["id"]): o for o in (offers if offers is not None else load_catalog(catalog))
        }
        self.ssh_user = ssh_user
        self.base_python = base_python
        self.python = python
        self.lock = threading.RLock()
        self.faults = faults or Faults()
        self.rng = random.Random(self.faults.seed)
        self.instances: dict[int, Instance] = {}
        self.destroyed: list[Instance] = []
        self.taken: set[int] = set()  # asks rented by "someone else" (vanished)
        self.offline_machines: set[int] = set()
        self.account_keys: dict[int, str] = {}
        self.stats: Counter[str] = Counter()
        self.started_pids: list[int] = []  # every box server ever started (tests check they died)
        self._next_id = first_instance_id
        self._next_key = 1
        self.closed = False
        self.sweep_stale_boxes()

    # -- housekeeping -------------------------------------------------------------------------
    def sweep_stale_boxes(self) -> list[Path]:
        """Remove boxes an earlier emulator left in ``boxes_dir`` (marked by ``MARKER_FILE``)."""
        removed = []
        for d in sorted(self.boxes_dir.iterdir()):
            if (localbox.control_dir(d) / MARKER_FILE).exists():
                localbox.remove_box(d)
                removed.append(d)
        return removed

    def close(self) -> None:
        """Destroy every instance (kill and delete its box). Idempotent."""
        with self.lock:
            self.closed = True
            for inst in list(self.instances.values()):
                self._remove(inst)
            self.instances.clear()

    def set_faults(self, faults: Faults | dict[str, Any], *, merge: bool = True) -> Faults:
        """Replace (or with ``merge``, update) the faults and re-seed the random generator."""
        with self.lock:
            data = faults.model_dump(exclude_unset=True) if isinstance(faults, Faults) else dict(faults)
            base = self.faults.model_dump() if merge else {}
            self.faults = Faults.model_validate({**base, **data})
            self.rng = random.Random(self.faults.seed)
            return self.faults

    def _draw(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    def api_fault(self, route: str) -> ApiError | None:
        """The error this API call answers instead of working, or None (counts every call)."""
        with self.lock:
            self.stats[f"requests:{route}"] += 1
            if not self._draw(self.faults.error_rate):
                return None
            status = self.rng.choice(self.faults.error_statuses or [503])
            self.stats[f"injected:{status}"] += 1
            self.stats["injected"] += 1
            headers = {}
            if status == 429 and self.faults.retry_after_s is not None:
                headers["Retry-After"] = f"{self.faults.retry_after_s:g}"
            if status == 429:
                return ApiError(429, "too_many_requests", "API requests too frequent", headers)
            return ApiError(status, "server_error", f"emulated server error {status}", headers)

    def lost_reply(self, route: str) -> bool:
        """Whether the reply to a call that was just carried out gets lost (answered 502)."""
        with self.lock:
            scripted = route in self.faults.lose_replies
            if scripted:
                self.faults.lose_replies.remove(route)  # type: ignore[arg-type]
            if scripted or self._draw(self.faults.lost_reply_rate):
                self.stats["lost_replies"] += 1
                return True
            return False

    # -- offers -------------------------------------------------------------------------------
    def _rented_asks(self) -> set[int]:
        return {int(i.ask["id"]) for i in self.instances.values()}

    def available(self, ask_id: int) -> dict[str, Any] | None:
        row = self.offers.get(ask_id)
        if row is None or ask_id in self.taken or int(row["machine_id"]) in self.offline_machines:
            return None
        if not row.get("rentable", True) or ask_id in self._rented_asks():
            return None
        return row

    def search(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        """``POST /bundles/``: offers matching ``query``, priced, ordered, limited."""
        kind = str(query.get("type") or "on-demand")
        bid = kind in ("bid", "interruptible")
        try:
            raw = query.get("allocated_storage")
            storage = float(raw) if raw is not None else 5.0
        except (TypeError, ValueError):
            raise QueryError(f"allocated_storage {query.get('allocated_storage')!r} is not a number") from None
        with self.lock:
            rented = self._rented_asks()
            rows = []
            for ask_id, row in self.offers.items():
                live = dict(row)
                live["rented"] = ask_id in rented or ask_id in self.taken
                live["rentable"] = (
                    bool(row.get("rentable", True)) and int(row["machine_id"]) not in self.offline_machines
                )
                live = priced(live, allocated_storage=storage, bid=bid)
                if matches(live, query):
                    rows.append(live)
        rows = order_rows(rows, query.get("order") or [["score", "desc"]])
        limit = query.get("limit")
        if limit is not None:
            try:
                rows = rows[: max(int(float(limit)), 0)]
            except (TypeError, ValueError):
                raise QueryError(f"limit {limit!r} is not a number") from None
        return rows

    def add_offer(self, entry: dict[str, Any]) -> dict[str, Any]:
        from .catalog import complete_offer

        with self.lock:
            row = complete_offer(entry, index=len(self.offers) + 1000)
            if int(row["id"]) in self.offers:
                raise ApiError(409, "duplicate_ask", f"offer {row['id']} exists")
            self.offers[int(row["id"])] = row
            return row

    def remove_offer(self, ask_id: int) -> bool:
        with self.lock:
            return self.offers.pop(ask_id, None) is not None

    # -- instances ----------------------------------------------------------------------------
    def _outcome(self) -> Outcome:
        f = self.faults
        if f.next_create:
            return f.next_create.pop(0)
        if self._draw(f.vanish_rate):
            return "vanish"
        if self._draw(f.create_fail_rate):
            return "reject" if f.create_fail_mode == "reject" else "boot_fail"
        if self._draw(f.stuck_rate):
            return "stuck"
        if self._draw(f.offline_rate):
            return "offline"
        return "ok"

    def create(self, ask_id: int, body: dict[str, Any]) -> int:
        """``PUT /asks/{id}/``: rent an offer; returns the new instance (contract) id."""
        with self.lock:
            if self.closed:
                raise ApiError(503, "shutting_down", "the emulator is stopping")
            row = self.available(ask_id)
            if row is None:
                raise ApiError(404, "no_such_ask", f"Instance type by id {ask_id} is not available.")
            price_arg = body.get("price")
            bid = price_arg is not None
            price = 0.0
            if price_arg is not None:
                try:
                    price = float(price_arg)
                except (TypeError, ValueError):
                    raise ApiError(400, "invalid_args", f"price {price_arg!r} is not a number") from None
                if price + 1e-9 < float(row["min_bid"]):
                    raise ApiError(400, "invalid_price", f"bid ${price:.4f}/h is below min_bid ${row['min_bid']}/h")
            try:
                disk = float(body.get("disk") or 10)
            except (TypeError, ValueError):
                raise ApiError(400, "invalid_args", f"disk {body.get('disk')!r} is not a number") from None
            if disk > float(row["disk_space"]) + 1e-9:
                raise ApiError(
                    400, "invalid_args", f"disk {disk:g} GB is more than the {row['disk_space']:g} GB offered"
                )
            env = body.get("env") or {}
            if not isinstance(env, dict):
                raise ApiError(400, "invalid_args", "env must be an object")
            outcome = self._outcome()
            self.stats[f"create:{outcome}"] += 1
            if outcome == "vanish":
                self.taken.add(ask_id)
                raise ApiError(404, "no_such_ask", f"Instance type by id {ask_id} is not available.")
            if outcome == "reject":
                raise ApiError(400, "create_failed", f"the host of offer {ask_id} refused the contract (emulated)")
            rented = priced(row, allocated_storage=disk, bid=bid)
            iid = self._next_id
            self._next_id += 1
            now = time.monotonic()
            inst = Instance(
                id=iid,
                ask=rented,
                label=body.get("label"),
                image=body.get("image"),
                disk=disk,
                env={str(k): str(v) for k, v in env.items() if not str(k).startswith("-")},
                onstart=body.get("onstart") or None,
                price=price + float(rented["storage_total_cost"]) if bid else float(rented["dph_total"]),
                is_bid=bid,
                box_dir=self.boxes_dir / f"i{iid}",
                outcome=outcome,
                created=time.time(),
                ready_at=now + self.faults.boot_delay_s,
                keys=list(self.account_keys.values()),
            )
            if outcome == "offline":
                inst.offline_after = self.faults.offline_after_s
            self._prepare_box(inst)
            self.instances[iid] = inst
            if outcome in ("ok", "offline"):
                self._start_box(inst)
            log.info("instance %s created from offer %s (%s)", iid, ask_id, outcome)
            return iid

    def _prepare_box(self, inst: Instance) -> None:
        ctl = localbox.control_dir(inst.box_dir)
        ctl.mkdir(parents=True, exist_ok=True)
        inst.box_dir.chmod(0o700)
        (ctl / MARKER_FILE).write_text(json.dumps({"instance_id": inst.id, "ask_id": inst.ask["id"]}))
        keys = ctl / "authorized_keys"
        keys.touch(mode=0o600)
        for key in inst.keys:
            localbox.add_authorized_key(inst.box_dir, key)

    def _start_box(self, inst: Instance) -> None:
        pid = localbox.start_box(
            inst.box_dir,
            authorized_key=localbox.control_dir(inst.box_dir) / "authorized_keys",
            user=self.ssh_user,
            base_python=self.base_python,
            env=inst.env,
            start_command=inst.onstart,
            python=self.python,
        )
        self.started_pids.append(pid)
        inst.box_started = True

    def _remove(self, inst: Instance) -> None:
        localbox.remove_box(inst.box_dir)
        if inst.box_dir.exists():  # remove_box ignores errors; make sure nothing is left
            shutil.rmtree(inst.box_dir, ignore_errors=True)
        inst.destroyed_at = time.time()

    def get(self, iid: int) -> Instance | None:
        with self.lock:
            return self.instances.get(iid)

    def destroy(self, iid: int) -> None:
        """``DELETE /instances/{id}/``: kill and delete the box; the offer is free again."""
        with self.lock:
            inst = self.instances.pop(iid, None)
            if inst is None:
                raise ApiError(404, "no_such_instance", f"instance {iid} not found")
            self._remove(inst)
            self.destroyed.append(inst)
            log.info("instance %s destroyed", iid)

    def set_state(self, iid: int, state: str) -> None:
        """``PUT /instances/{id}/ {"state": ...}``: ``stopped`` stops the box, ``running`` restarts it."""
        with self.lock:
            inst = self._must(iid)
            if state == "stopped":
                inst.intended = "stopped"
                if inst.box_started:
                    _stop_box(inst.box_dir)
            elif state == "running":
                if inst.offline:
                    raise ApiError(400, "machine_offline", f"the host of instance {iid} is offline")
                was = inst.intended
                inst.intended = "running"
                if was == "stopped" and inst.outcome in ("ok", "offline"):
                    inst.ready_at = time.monotonic() + self.faults.boot_delay_s
                    self._start_box(inst)
            else:
                raise ApiError(400, "invalid_args", f"state must be running or stopped, not {state!r}")

    def set_label(self, iid: int, label: str | None) -> None:
        with self.lock:
            self._must(iid).label = label

    def attach_key(self, iid: int, key: str) -> None:
        """``POST /instances/{id}/ssh/``: the box accepts this key from its next login on."""
        key = " ".join(str(key).split())
        if not key.startswith(("ssh-", "ecdsa-", "sk-")) or "PRIVATE KEY" in key:
            raise ApiError(400, "invalid_args", "ssh_key must be one OpenSSH public key line")
        with self.lock:
            inst = self._must(iid)
            if key not in inst.keys:
                inst.keys.append(key)
            localbox.add_authorized_key(inst.box_dir, key)

    def add_account_key(self, key: str) -> dict[str, Any]:
        key = " ".join(str(key).split())
        if not key.startswith(("ssh-", "ecdsa-", "sk-")) or "PRIVATE KEY" in key:
            raise ApiError(400, "invalid_args", "ssh_key must be one OpenSSH public key line")
        with self.lock:
            kid = self._next_key
            self._next_key += 1
            self.account_keys[kid] = key
            return {"id": kid, "public_key": key, "created_at": time.time()}

    def _must(self, iid: int) -> Instance:
        inst = self.instances.get(iid)
        if inst is None:
            raise ApiError(404, "no_such_instance", f"instance {iid} not found")
        return inst

    # -- faults on demand -----------------------------------------------------------------------
    def take_offline(self, iid: int, reason: str = "host went offline") -> None:
        """The instance's host dies: its box is SIGKILLed (with everything it ran)."""
        with self.lock:
            inst = self._must(iid)
            self._kill(inst, reason)

    def _kill(self, inst: Instance, reason: str) -> None:
        if inst.box_started:
            localbox.kill_box(inst.box_dir)
        inst.offline = True
        inst.offline_after = None
        inst.status_msg = reason
        self.stats["offline"] += 1
        log.info("instance %s offline: %s", inst.id, reason)

    def machine_offline(self, machine_id: int) -> list[int]:
        """A whole machine goes away: its instances go offline, its offers are no longer rentable."""
        with self.lock:
            self.offline_machines.add(machine_id)
            hit = [i for i in self.instances.values() if int(i.ask["machine_id"]) == machine_id]
            for inst in hit:
                self._kill(inst, f"machine {machine_id} went offline")
            return [i.id for i in hit]

    def machine_online(self, machine_id: int) -> None:
        """The machine is back: its offers are rentable again (instances lost on it stay offline)."""
        with self.lock:
            self.offline_machines.discard(machine_id)

    def tick(self) -> None:
        """Carry out timed faults (a host going offline while nobody asks)."""
        now = time.monotonic()
        with self.lock:
            for inst in list(self.instances.values()):
                if inst.offline_after is None or inst.offline:
                    continue
                if inst.running_since is None:
                    if now >= inst.ready_at and localbox.box_state(inst.box_dir) == "running":
                        inst.running_since = now
                elif now >= inst.running_since + inst.offline_after:
                    self._kill(inst, "host went offline")

    # -- rows as the API answers them ----------------------------------------------------------
    def _status(self, inst: Instance) -> tuple[str, str, str]:
        """(actual_status, cur_state, status_msg)."""
        now = time.monotonic()
        if inst.offline:
            return "offline", "running", inst.status_msg
        if inst.outcome == "stuck":
            return "loading", "running", "Pulling image layers (stalled)"
        if inst.outcome == "boot_fail":
            if now < inst.ready_at:
                return "loading", "running", "Creating container"
            return "created", "stopped", OCI_ERROR
        if inst.intended == "stopped":
            return "exited", "stopped", "stopped by the user"
        state = localbox.box_state(inst.box_dir)
        if state == "running":
            if now < inst.ready_at:
                return "loading", "running", "Starting container"
            return "running", "running", "success, running"
        if state == "loading":
            return "loading", "running", "Starting container"
        if state == "exited":
            return "exited", "stopped", "container exited"
        return "offline", "running", "host is unreachable"

    def row(self, inst: Instance) -> dict[str, Any]:
        """The instance as ``GET /instances/`` answers it (every field the SDK and CLI read)."""
        with self.lock:
            actual, cur, msg = self._status(inst)
            info = localbox.read_box(inst.box_dir) if actual == "running" else None
            port = info.port if info is not None else None
            a = inst.ask
            uptime = max(time.time() - inst.created, 0.0) / 60
            return {
                "id": inst.id,
                "machine_id": a["machine_id"],
                "host_id": a["host_id"],
                "bundle_id": a["id"],
                "ask_id": a["id"],
                "actual_status": actual,
                "cur_state": cur,
                "next_state": "stopped" if inst.intended == "stopped" else "running",
                "intended_status": inst.intended,
                "status_msg": msg,
                "label": inst.label,
                "image_uuid": inst.image,
                "image_runtype": "ssh_direc ssh_proxy",
                "image_args": [],
                "onstart": inst.onstart,
                "extra_env": [[k, v] for k, v in inst.env.items()],
                "num_gpus": a["num_gpus"],
                "gpu_name": a["gpu_name"],
                "gpu_ram": a["gpu_ram"],
                "gpu_totalram": a["gpu_total_ram"],
                "gpu_util": 0.0 if actual == "running" else None,
                "gpu_temp": 40.0 if actual == "running" else None,
                "gpu_arch": a["gpu_arch"],
                "cuda_max_good": a["cuda_max_good"],
                "driver_version": a["driver_version"],
                "compute_cap": a["compute_cap"],
                "cpu_name": a["cpu_name"],
                "cpu_cores": a["cpu_cores"],
                "cpu_cores_effective": a["cpu_cores_effective"],
                "cpu_util": 0.0,
                "cpu_ram": a["cpu_ram"],
                "mem_limit": a["cpu_ram"] / 1000,
                "mem_usage": 0.0,
                "vmem_usage": 0.0,
                "disk_space": inst.disk,
                "disk_usage": 0.0,
                "disk_util": 0.0,
                "inet_up": a["inet_up"],
                "inet_down": a["inet_down"],
                "geolocation": a["geolocation"],
                "reliability2": a["reliability"],
                "verification": a["verification"],
                "dph_base": a["dph_base"],
                "dph_total": round(inst.price, 6),
                "storage_cost": a["storage_cost"],
                "min_bid": a["min_bid"],
                "is_bid": inst.is_bid,
                "ssh_host": "127.0.0.1" if port else None,
                "ssh_port": port,
                "ssh_idx": "0",
                "public_ipaddr": "127.0.0.1",
                "local_ipaddrs": "127.0.0.1",
                "ports": {"22/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]} if port else {},
                "direct_port_start": port,
                "direct_port_end": port,
                "jupyter_token": None,
                "start_date": inst.created,
                "end_date": inst.created + float(a["duration"]),
                "uptime_mins": round(uptime, 3),
                "duration": max(time.time() - inst.created, 0.0),
                "template_id": None,
                "template_hash_id": None,
                "template_name": None,
                "volume_info": None,
                "client_run_time": round(uptime * 60, 3),
                "host_run_time": round(uptime * 60, 3),
            }

    def rows(self) -> list[dict[str, Any]]:
        with self.lock:
            return [self.row(i) for i in sorted(self.instances.values(), key=lambda i: i.id)]

    def box_info(self, inst: Instance) -> dict[str, Any]:
        """Admin view of one instance: its box (folder, pid, port, host key) and fault outcome."""
        info = localbox.read_box(inst.box_dir)
        host_key = None
        pub = localbox.control_dir(inst.box_dir) / "host_key.pub"
        if pub.exists():
            host_key = pub.read_text().strip()
        return {
            "id": inst.id,
            "outcome": inst.outcome,
            "box_dir": str(inst.box_dir),
            "box_state": info.state,
            "pid": info.pid,
            "port": info.port,
            "host_key": host_key,
            "keys": list(inst.keys),
            "offline": inst.offline,
        }

    def cost(self, inst: Instance) -> float:
        end = inst.destroyed_at or time.time()
        return max(end - inst.created, 0.0) / 3600 * inst.price

    def billing(self) -> dict[str, Any]:
        """What is billing now (every instance not destroyed, as on vast.ai) and what was spent."""
        with self.lock:
            live = list(self.instances.values())
            return {
                "billing_instances": [i.id for i in live],
                "dollars_per_hour": round(sum(i.price for i in live), 6),
                "spent": round(sum(self.cost(i) for i in live + self.destroyed), 6),
            }

    def leftovers(self) -> list[str]:
        """Box folders still in ``boxes_dir`` (none once every instance is destroyed)."""
        return [str(d) for d in sorted(self.boxes_dir.iterdir())] if self.boxes_dir.exists() else []


def _stop_box(box_dir: Path) -> None:
    """Run the coroutine ``localbox.stop_box`` to completion from sync code, in a thread of its
    own so that it works whether or not the caller's thread runs an event loop."""
    import asyncio

    worker = threading.Thread(target=asyncio.run, args=(localbox.stop_box(box_dir),), daemon=True)
    worker.start()
    worker.join(30)


def query_error(exc: QueryError) -> ApiError:
    return ApiError(400, "invalid_query", str(exc))
