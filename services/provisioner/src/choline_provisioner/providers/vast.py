"""The vast.ai provider, through the ``vastai`` package's synchronous SDK (``vastai.VastAI``).

Every SDK call runs in a worker thread (``asyncio.to_thread``) and goes through one retry
loop: 429 and 5xx answers and dropped connections are retried with exponential backoff
(honouring ``Retry-After``); 401/403 is ``Unauthorized``; anything still failing after
``max_attempts`` is ``VastUnavailable`` (retryable). The SDK's own retry is turned off so that
the one loop decides.

Offers: the query asks vast.ai for the spec's GPUs (vast's names for the model, at least the
count, enough memory) above the floors: reliability (default 0.98), verified hosts, direct SSH
ports, download bandwidth, disk and CUDA version, and not on a host this run lost; the same
floors are checked again on the answer, and ``search_offers`` ranks as every provider does.
``Offer.host_id`` is vast's ``machine_id`` (the physical machine; vast's ``host_id`` names the
hosting account and is kept in ``Offer.extra``).

Create: ``PUT /asks/{offer}/`` with image, disk, env, start command (``onstart``) and one label
string (``encode_labels``), then the run's public key is attached to the instance. Renting is
not idempotent on vast.ai, so every create carries a one-off ``choline.request`` label: when
an answer is lost (5xx, dropped connection) the provider looks for an instance with that label
before trying again, and never rents twice. An offer that is gone is ``NoCapacity``; a refused
create is ``ProvisioningFailed``. Interruptible instances (``bid_price``, or
``interruptible=True`` which bids the offer's minimum) search and rent at bid prices.

States: vast's ``actual_status`` (with ``intended_status`` and ``status_msg``) maps onto
``InstanceState``: ``running`` -> running; ``loading``/``scheduling``/a fresh ``created``
-> loading; ``exited``/``stopped``, a stop under way, or ``created`` with a container error ->
exited; ``offline`` -> offline; no row -> gone; anything else -> unknown.

SSH: the direct ``22/tcp`` mapping on ``public_ipaddr`` when present, else vast's
``ssh_host``/``ssh_port``; user ``root``; commands run in the login's home. The host key is not
published by vast.ai, so it is pinned at first contact under ``vast/<instance id>``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar, NoReturn, TypeVar

from choline_core.errors import NoCapacity, NotYetReady, ProviderError, ProvisioningFailed, Retryable, Unauthorized
from choline_core.logs import register_secret
from choline_core.specs import GpuSpec

from .base import (
    Instance,
    InstanceRequest,
    InstanceState,
    InstanceUnavailable,
    Provider,
    SshEndpoint,
    check_labels,
    decode_labels,
    encode_labels,
    labels_match,
)
from .offers import Offer, OfferFilters, gpu_model_name

log = logging.getLogger(__name__)

T = TypeVar("T")

#: the one-off label that makes a create findable when its answer was lost
LABEL_REQUEST = "choline.request"
DEFAULT_IMAGE = "pytorch/pytorch:latest"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: vast's error codes (``error`` in the answer) that mean "this offer is no longer there"
GONE_OFFER_ERRORS = frozenset({"no_such_ask", "ask_not_found", "ask_unavailable", "not_available", "already_rented"})

#: choline's model -> the names vast.ai lists it under (vast writes ``A100 SXM4``, ``H100 SXM``, ...)
VAST_GPU_NAMES: dict[str, tuple[str, ...]] = {
    "A100": ("A100 PCIE", "A100 SXM4", "A100 SXM", "A100X"),
    "H100": ("H100 PCIE", "H100 SXM", "H100 NVL"),
    "H200": ("H200", "H200 NVL"),
    "B200": ("B200",),
    "RTX 6000 Ada": ("RTX 6000Ada", "RTX 6000 Ada"),
    "RTX PRO 6000": ("RTX PRO 6000 WS", "RTX PRO 6000 S", "RTX PRO 6000"),
    "V100": ("Tesla V100", "V100"),
    "T4": ("Tesla T4", "T4"),
    "P100": ("Tesla P100", "P100"),
}


class VastUnavailable(ProviderError, Retryable):
    """vast.ai could not be asked (rate limited, server errors, network) after every retry."""

    kind = "vast_unavailable"


def vast_gpu_names(model: str) -> list[str]:
    """vast.ai's names for one of choline's canonical models (``A100`` -> ``A100 SXM4``, ...)."""
    return list(VAST_GPU_NAMES.get(model, (model,)))


def vast_gpu_model(name: str | None) -> str | None:
    """choline's canonical model for a GPU name as vast.ai lists it, or None."""
    if not name:
        return None
    for model, names in VAST_GPU_NAMES.items():
        if name in names:
            return model
    return gpu_model_name(name)


def vast_state(row: Mapping[str, Any] | None) -> InstanceState:
    """Normalise one instance row of the vast API (see the module doc)."""
    if row is None:
        return InstanceState.GONE
    actual = str(row.get("actual_status") or "").lower()
    intended = str(row.get("intended_status") or "").lower()
    msg = str(row.get("status_msg") or "").lower()
    if actual == "offline":
        return InstanceState.OFFLINE
    if actual in ("exited", "stopped") or (intended == "stopped" and actual in ("", "running", "loading")):
        return InstanceState.EXITED
    if actual == "running":
        return InstanceState.RUNNING
    if actual == "created" and ("error" in msg or "failed" in msg):
        return InstanceState.EXITED  # the container never started (image pull, OCI runtime)
    if actual in ("loading", "scheduling", "created", "") and intended in ("running", ""):
        return InstanceState.LOADING
    return InstanceState.UNKNOWN


def _number(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _retry_after(response: Any) -> float | None:
    if response is None:
        return None
    return _number(response.headers.get("Retry-After"))


def _answer(exc: Exception) -> tuple[int, str, str]:
    """(HTTP status, vast error code, message) of a failed SDK call."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", 0) or 0
    code, msg = "", ""
    if response is not None:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            code = str(body.get("error") or "")
            msg = str(body.get("msg") or body.get("message") or "")
        if not msg:
            msg = (response.text or "")[:300]
    return status, code, " ".join((msg or str(exc)).split())


class VastProvider(Provider):
    """vast.ai instances. ``api_key`` (choline's ``CHOLINE_VAST_API_KEY``) is required unless the
    SDK finds one itself (``VAST_API_KEY``, ``~/.config/vastai/vast_api_key``); ``server_url``
    points the SDK elsewhere (``CHOLINE_VAST_URL``: the emulator, a proxy).

    Floors (``None`` turns one off): ``min_reliability``, ``verified_only``, ``direct_ssh``
    (at least one direct port), ``min_inet_down_mbps``, ``min_cuda``; ``disk_gb`` is the disk
    rented (and the disk an offer must have) unless a request says otherwise. ``interruptible``
    searches and rents at bid prices. Retries: ``max_attempts`` calls per operation,
    ``backoff_s`` doubling up to ``max_backoff_s``; ``request_timeout_s`` per HTTP request.
    """

    name: ClassVar[str] = "vast"

    def __init__(
        self,
        *,
        api_key: str | None = None,
        server_url: str | None = None,
        image: str = DEFAULT_IMAGE,
        disk_gb: float = 40.0,
        interruptible: bool = False,
        min_reliability: float | None = 0.98,
        verified_only: bool = True,
        direct_ssh: bool = True,
        min_inet_down_mbps: float | None = 100.0,
        min_cuda: float | None = 12.1,
        search_limit: int = 64,
        max_attempts: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        request_timeout_s: float = 30.0,
        ssh_user: str = "root",
    ) -> None:
        import vastai

        try:
            sdk = vastai.VastAI(
                api_key=api_key or None, server_url=server_url.rstrip("/") if server_url else None, retry=1
            )
        except RuntimeError:
            raise Unauthorized(
                "no vast.ai API key",
                hint="set CHOLINE_VAST_API_KEY (your key from https://cloud.vast.ai/account/), "
                "or point CHOLINE_VAST_URL at the emulator with its key (docs/vast.md)",
            ) from None
        register_secret(sdk.client.api_key)
        sdk.client.timeout = request_timeout_s
        self._sdk = sdk
        self.server_url = sdk.client.server_url
        self.image = image
        self.disk_gb = disk_gb
        self.interruptible = interruptible
        self.min_reliability = min_reliability
        self.verified_only = verified_only
        self.direct_ssh = direct_ssh
        self.min_inet_down_mbps = min_inet_down_mbps
        self.min_cuda = min_cuda
        self.search_limit = search_limit
        self.max_attempts = max(1, max_attempts)
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.ssh_user = ssh_user

    def __repr__(self) -> str:  # never the key
        return f"VastProvider(server_url={self.server_url!r})"

    # -- calling the SDK ------------------------------------------------------------------------
    async def _call(
        self,
        what: str,
        fn: Callable[..., T],
        *args: Any,
        recover: Callable[[], Awaitable[T | None]] | None = None,
        **kwargs: Any,
    ) -> T:
        """``fn(*args, **kwargs)`` in a thread, retried on 429/5xx/connection errors.

        ``recover`` (for calls that are not idempotent) runs before a retry that follows an
        answer that may have been lost (5xx, dropped connection): a value it returns is the
        call's result. 4xx answers other than 401/403/429 propagate as ``requests.HTTPError``.
        """
        import requests

        delay = self.backoff_s
        for attempt in range(1, self.max_attempts + 1):
            wait: float | None = None
            try:
                return await asyncio.to_thread(fn, *args, **kwargs)
            except requests.HTTPError as exc:
                status, code, msg = _answer(exc)
                if status in (401, 403):
                    raise Unauthorized(
                        f"vast.ai refused the API key ({status}): {msg}",
                        hint="check CHOLINE_VAST_API_KEY (and CHOLINE_VAST_URL if you set one)",
                    ) from None
                if status not in RETRY_STATUSES:
                    raise
                problem = f"{status} {code or msg}".strip()
                wait = _retry_after(exc.response) if status == 429 else None
                ambiguous = status != 429
            except (requests.ConnectionError, requests.Timeout) as exc:
                problem = f"{type(exc).__name__}"
                ambiguous = True
            except (ValueError, KeyError, TypeError) as exc:
                raise ProviderError(
                    f"vast.ai answered {what} with something unexpected: {type(exc).__name__}: {exc}"
                ) from None
            if ambiguous and recover is not None:
                found = await recover()
                if found is not None:
                    log.info("vast %s: the answer was lost (%s) but the call had worked", what, problem)
                    return found
            if attempt == self.max_attempts:
                raise VastUnavailable(
                    f"vast.ai could not {what} after {attempt} tries: {problem}",
                    hint="vast.ai is rate limiting or failing; choline retries later",
                    detail={"what": what, "last": problem},
                )
            pause = min(wait if wait is not None else delay, self.max_backoff_s)
            log.info("vast %s: %s; retry %d/%d in %.2fs", what, problem, attempt, self.max_attempts - 1, pause)
            await asyncio.sleep(pause)
            delay = min(delay * 2, self.max_backoff_s)
        raise AssertionError("unreachable")

    async def _row(self, instance_id: str) -> dict[str, Any] | None:
        """One instance's row, or None when vast.ai has no such instance (for this account)."""
        import requests

        if not instance_id.isdigit():
            return None
        try:
            row = await self._call("show the instance", self._sdk.show_instance, int(instance_id))
        except requests.HTTPError as exc:
            status, code, msg = _answer(exc)
            if status in (400, 404):
                return None
            raise ProviderError(f"vast.ai cannot show instance {instance_id}: {status} {code} {msg}") from None
        return row if isinstance(row, dict) else None

    async def _rows(self) -> list[dict[str, Any]]:
        import requests

        try:
            rows = await self._call("list instances", self._sdk.show_instances)
        except requests.HTTPError as exc:
            status, code, msg = _answer(exc)
            raise ProviderError(f"vast.ai cannot list instances: {status} {code} {msg}") from None
        return [r for r in rows or [] if isinstance(r, dict)]

    # -- offers ---------------------------------------------------------------------------------
    def _floors(self, filters: OfferFilters) -> dict[str, float | None]:
        def stricter(a: float | None, b: float | None) -> float | None:
            return b if a is None else a if b is None else max(a, b)

        return {
            "reliability": stricter(self.min_reliability, filters.min_reliability),
            "inet_down": stricter(self.min_inet_down_mbps, filters.min_inet_down_mbps),
            "disk_space": stricter(self.disk_gb, filters.min_disk_gb),
            "cuda_max_good": self.min_cuda,
            "dph_total": filters.max_price_per_hour,
        }

    def offer_query(self, spec: GpuSpec, filters: OfferFilters) -> dict[str, Any]:
        """The ``/bundles/`` query for ``spec`` under ``filters`` and this provider's floors."""
        q: dict[str, Any] = {"rentable": {"eq": True}, "rented": {"eq": False}, "external": {"eq": False}}
        if self.verified_only:
            q["verified"] = {"eq": True}
        if self.direct_ssh:
            q["direct_port_count"] = {"gte": 1}
        floors = self._floors(filters)
        for field in ("reliability", "inet_down", "disk_space", "cuda_max_good"):
            if floors[field] is not None:
                q[field] = {"gte": floors[field]}
        if floors["dph_total"] is not None:
            q["dph_total"] = {"lte": floors["dph_total"]}
        if not spec.is_cpu and spec.model:
            q["gpu_name"] = {"in": vast_gpu_names(spec.model)}
            q["num_gpus"] = {"gte": spec.count}
            if spec.memory_gb:
                q["gpu_ram"] = {"gte": round(spec.memory_gb * 1024 * 0.95)}
        machines = sorted(int(h) for h in filters.exclude_hosts if h.isdigit())
        if machines:
            q["machine_id"] = {"notin": machines}
        return q

    def to_offer(self, row: Mapping[str, Any]) -> Offer | None:
        """An ``Offer`` from one row of vast's offers; None for a row that cannot be one."""
        price = _number(row.get("dph_total"))
        machine = row.get("machine_id")
        if price is None or row.get("id") is None or machine is None:
            return None
        n = int(_number(row.get("num_gpus")) or 0)
        vast_name = row.get("gpu_name")
        mem_mb = _number(row.get("gpu_ram")) or 0.0
        reliability = _number(row.get("reliability2"))
        if reliability is None:
            reliability = _number(row.get("reliability"))
        ram = _number(row.get("cpu_ram"))
        cores = _number(row.get("cpu_cores_effective"))
        return Offer(
            provider=self.name,
            offer_id=str(row["id"]),
            host_id=str(machine),
            gpu_name=(vast_gpu_model(vast_name) or vast_name) if n else None,
            gpu_count=n,
            gpu_memory_gb=round(mem_mb / 1024, 1),
            price_per_hour=round(price, 6),
            reliability=min(max(reliability if reliability is not None else 0.0, 0.0), 1.0),
            inet_down_mbps=_number(row.get("inet_down")),
            inet_up_mbps=_number(row.get("inet_up")),
            disk_gb=_number(row.get("disk_space")),
            cpu_cores=int(cores) if cores is not None else None,
            ram_gb=round(ram / 1000, 1) if ram is not None else None,
            location=row.get("geolocation"),
            extra={
                "vast_gpu_name": vast_name,
                "machine_id": machine,
                "host_id": row.get("host_id"),
                "min_bid": _number(row.get("min_bid")),
                "dph_base": _number(row.get("dph_base")),
                "interruptible": self.interruptible,
                "cuda_max_good": _number(row.get("cuda_max_good")),
                "verified": row.get("verification") == "verified" or row.get("verified") is True,
                "direct_port_count": row.get("direct_port_count"),
            },
        )

    def passes_floors(self, row: Mapping[str, Any], filters: OfferFilters) -> bool:
        """The provider's floors, checked on the answer too (a server may ignore a filter)."""
        if row.get("rentable") is False or row.get("rented") is True:
            return False
        if self.verified_only and not (row.get("verification") == "verified" or row.get("verified") is True):
            return False
        if self.direct_ssh and (_number(row.get("direct_port_count")) or 0) < 1:
            return False
        for field, floor in self._floors(filters).items():
            if floor is None:
                continue
            have = _number(row.get("reliability2" if field == "reliability" else field))
            if field == "reliability" and have is None:
                have = _number(row.get("reliability"))
            if have is None:
                return False
            if field == "dph_total":
                if have > floor + 1e-9:
                    return False
            elif have + 1e-9 < floor:
                return False
        return True

    async def fetch_offers(self, spec: GpuSpec, filters: OfferFilters) -> list[Offer]:
        import requests

        query = self.offer_query(spec, filters)
        try:
            rows = await self._call(
                "search offers",
                self._sdk.search_offers,
                query=query,
                type="bid" if self.interruptible else "on-demand",
                order="dph_total",
                limit=self.search_limit,
                no_default=True,  # the query carries rentable/rented/external/verified itself
                storage=max(self.disk_gb, filters.min_disk_gb or 0.0),
            )
        except requests.HTTPError as exc:
            status, code, msg = _answer(exc)
            raise ProviderError(f"vast.ai refused the offer search: {status} {code} {msg}") from None
        offers = []
        for row in rows if isinstance(rows, list) else []:
            if isinstance(row, dict) and self.passes_floors(row, filters):
                offer = self.to_offer(row)
                if offer is not None:
                    offers.append(offer)
        return offers

    # -- instances ------------------------------------------------------------------------------
    async def _find_request(self, nonce: str) -> str | None:
        """The instance a lost create made, by its one-off label (None when there is none)."""
        try:
            rows = await self._rows()
        except ProviderError:
            return None
        for row in rows:
            if decode_labels(row.get("label")).get(LABEL_REQUEST) == nonce:
                return str(row["id"])
        return None

    async def create_instance(self, offer: Offer, request: InstanceRequest) -> str:
        import requests

        if offer.provider != self.name or not offer.offer_id.isdigit():
            raise ProvisioningFailed(f"offer {offer.offer_id} is from {offer.provider}, not vast")
        nonce = secrets.token_hex(6)
        labels = {**check_labels(request.labels), LABEL_REQUEST: nonce}
        min_bid = _number(offer.extra.get("min_bid"))
        bid = request.bid_price
        if bid is None and self.interruptible:
            bid = min_bid if min_bid is not None else offer.price_per_hour
        if bid is not None and min_bid is not None and bid + 1e-9 < min_bid:
            raise ProvisioningFailed(
                f"bid ${bid:.4f}/h is below offer {offer.offer_id}'s minimum bid ${min_bid:.4f}/h",
                hint="bid at least the offer's min_bid, or rent on demand",
            )

        async def lost_create() -> dict[str, Any] | None:
            found = await self._find_request(nonce)
            return {"success": True, "new_contract": int(found)} if found else None

        try:
            answer = await self._call(
                f"rent offer {offer.offer_id}",
                self._sdk.create_instance,
                int(offer.offer_id),
                image=request.image or self.image,
                disk=request.disk_gb or self.disk_gb,
                env=dict(request.env),
                bid_price=bid,
                label=encode_labels(labels),
                onstart_cmd=request.start_command,
                ssh=True,
                direct=self.direct_ssh,
                cancel_unavail=True,
                recover=lost_create,
            )
        except requests.HTTPError as exc:
            status, code, msg = _answer(exc)
            self._raise_create_error(offer, status, code, msg)
        if not isinstance(answer, dict) or not answer.get("success") or not answer.get("new_contract"):
            code = str(answer.get("error") or "") if isinstance(answer, dict) else ""
            msg = str(answer.get("msg") or answer) if isinstance(answer, dict) else str(answer)
            self._raise_create_error(offer, 200, code, msg)
        instance_id = str(answer["new_contract"])
        log.info("vast: rented offer %s as instance %s", offer.offer_id, instance_id)
        try:
            await self._attach_key(instance_id, request.ssh_public_key)
        except (ProviderError, Unauthorized) as exc:
            log.warning("vast instance %s: cannot attach the run's key (%s); destroying it", instance_id, exc)
            try:
                await self.destroy_instance(instance_id)
            except ProviderError:
                log.warning("vast instance %s: destroy failed too; the reaper will find it by its labels", instance_id)
            raise ProvisioningFailed(f"vast instance {instance_id}: cannot attach the run's SSH key: {exc}") from None
        return instance_id

    def _raise_create_error(self, offer: Offer, status: int, code: str, msg: str) -> NoReturn:
        text = f"vast.ai did not rent offer {offer.offer_id}: {status} {code} {msg}".strip()
        if status == 404 or code in GONE_OFFER_ERRORS or "not available" in msg.lower():
            raise NoCapacity(text, hint="the offer was taken meanwhile; search again", detail={"offer": offer.offer_id})
        raise ProvisioningFailed(text, detail={"offer": offer.offer_id, "status": status, "error": code})

    async def _attach_key(self, instance_id: str, public_key: str) -> None:
        import requests

        try:
            await self._call("attach the SSH key", self._sdk.attach_ssh, int(instance_id), public_key)
        except requests.HTTPError as exc:
            status, code, msg = _answer(exc)
            raise ProviderError(f"{status} {code} {msg}".strip()) from None

    async def status(self, instance_id: str) -> InstanceState:
        return vast_state(await self._row(instance_id))

    async def ssh_endpoint(self, instance_id: str) -> SshEndpoint:
        row = await self._row(instance_id)
        state = vast_state(row)
        if row is None:
            raise InstanceUnavailable(f"vast instance {instance_id} is gone")
        if state in (InstanceState.LOADING, InstanceState.UNKNOWN):
            raise NotYetReady(f"vast instance {instance_id} is {row.get('actual_status') or 'starting'}")
        if state is not InstanceState.RUNNING:
            raise InstanceUnavailable(
                f"vast instance {instance_id} is {state.value}: {row.get('status_msg') or ''}".strip().rstrip(":")
            )
        host, port = self._ssh_address(row)
        if not host or not port:
            raise NotYetReady(f"vast instance {instance_id} runs but has no SSH address yet")
        # workdir "~" (the login's home, /root on vast.ai) rather than None: with a workdir the
        # SSH client runs every command through ``sh -c``, so the image's login shell (bash on
        # vast.ai images) never changes how a command line parses
        return SshEndpoint(host=host, port=port, user=self.ssh_user, workdir="~", host_key_alias=f"vast/{instance_id}")

    def _ssh_address(self, row: Mapping[str, Any]) -> tuple[str | None, int | None]:
        if self.direct_ssh:
            ports = row.get("ports") if isinstance(row.get("ports"), dict) else {}
            mapping = ports.get("22/tcp") if ports else None
            ip = str(row.get("public_ipaddr") or "").strip()
            if ip and isinstance(mapping, list) and mapping:
                port = _number(mapping[0].get("HostPort")) if isinstance(mapping[0], dict) else None
                if port:
                    return ip, int(port)
        host = str(row.get("ssh_host") or "").strip() or None
        port = _number(row.get("ssh_port"))
        return host, int(port) if port else None

    async def destroy_instance(self, instance_id: str) -> None:
        import requests

        if not instance_id.isdigit():
            return

        async def lost_destroy() -> dict[str, Any] | None:
            return {"success": True} if await self._row(instance_id) is None else None

        try:
            answer = await self._call(
                f"destroy instance {instance_id}", self._sdk.destroy_instance, int(instance_id), recover=lost_destroy
            )
        except requests.HTTPError as exc:
            status, code, msg = _answer(exc)
            if status == 404 or code in ("no_such_instance", "not_found"):
                return
            raise ProviderError(f"vast.ai did not destroy instance {instance_id}: {status} {code} {msg}") from None
        if isinstance(answer, dict) and answer.get("success") is False:
            if answer.get("error") in ("no_such_instance", "not_found"):
                return
            raise ProviderError(f"vast.ai did not destroy instance {instance_id}: {answer.get('msg') or answer}")
        log.info("vast: destroyed instance %s", instance_id)

    async def list_instances(self, labels: Mapping[str, str]) -> list[Instance]:
        want = check_labels(labels)
        out = []
        for row in await self._rows():
            have = decode_labels(row.get("label"))
            if not labels_match(have, want):
                continue
            start = _number(row.get("start_date"))
            out.append(
                Instance(
                    provider=self.name,
                    instance_id=str(row["id"]),
                    state=vast_state(row),
                    labels=have,
                    offer_id=str(row["bundle_id"]) if row.get("bundle_id") is not None else None,
                    host_id=str(row["machine_id"]) if row.get("machine_id") is not None else None,
                    price_per_hour=_number(row.get("dph_total")),
                    created_at=dt.datetime.fromtimestamp(start, dt.timezone.utc) if start else None,
                    message=str(row.get("status_msg") or "") or None,
                )
            )
        return out

    # -- beyond the interface -------------------------------------------------------------------
    async def stop_instance(self, instance_id: str) -> None:
        """Stop (not destroy) an instance: it keeps its disk and is billed for storage only."""
        import requests

        try:
            await self._call(f"stop instance {instance_id}", self._sdk.stop_instance, int(instance_id))
        except requests.HTTPError as exc:
            status, code, msg = _answer(exc)
            raise ProviderError(f"vast.ai did not stop instance {instance_id}: {status} {code} {msg}") from None
