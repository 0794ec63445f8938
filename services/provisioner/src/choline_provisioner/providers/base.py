"""The provider interface: every way of getting a machine ("box") looks like this.

A provider searches offers, creates an instance from one, reports its state, gives its SSH
endpoint, destroys it, and lists the instances it holds for this installation. Every method is
async and returns quickly; nothing here waits for a machine to boot (``wait_until_running``
does that on top, for every provider alike).

Retry meaning travels in the exception type (``choline_core.errors``):

- ``NoCapacity`` (retryable): nothing matches, or the offer vanished before it could be rented;
  search again, later or elsewhere.
- ``ProvisioningFailed`` (final for this offer): the provider tried and failed; take the next
  offer.
- ``NotYetReady`` (retryable): the instance exists but cannot be used yet; ask again shortly.
- ``InstanceUnavailable``: the instance is exited, offline or gone; waiting will not help.

Labels: every instance choline creates carries ``choline.installation=<id>`` so that a reaper
lists, and may destroy, only what this installation created and never anything else the user
owns. ``create_instance`` and ``list_instances`` refuse to work without it.
"""

from __future__ import annotations

import asyncio
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from datetime import datetime
from enum import Enum
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from choline_core.errors import Bug, NotYetReady, ProviderError, ProvisioningFailed
from choline_core.specs import GpuSpec

from .offers import Offer, OfferFilters, rank_offers

LABEL_INSTALLATION = "choline.installation"
LABEL_RUN = "choline.run"
LABEL_BOX = "choline.box"

_LABEL_RE = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")


class InstanceState(str, Enum):
    """Normalised instance states, the same for every provider.

    - ``loading``: being created or booted; not usable yet.
    - ``running``: up; SSH should answer.
    - ``exited``: stopped cleanly (by the provider, the user, or its own start command failing).
    - ``offline``: the machine died or its host cannot be reached (killed, host down).
    - ``unknown``: the provider answered something choline cannot map, or could not be asked;
      on its own this is not evidence of a loss.
    - ``gone``: the provider has no such instance (destroyed, or never existed).
    """

    LOADING = "loading"
    RUNNING = "running"
    EXITED = "exited"
    OFFLINE = "offline"
    UNKNOWN = "unknown"
    GONE = "gone"


class InstanceUnavailable(ProviderError):
    """The instance is exited, offline or gone: it will not become reachable by waiting."""

    kind = "instance_unavailable"


def check_labels(labels: Mapping[str, str], *, need_installation: bool = True) -> dict[str, str]:
    """Validate label keys and values (``[A-Za-z0-9._:/-]``, 1-128 chars) and the installation label.

    The narrow alphabet lets providers that hold a single label string (vast.ai) encode a
    mapping unambiguously with ``encode_labels``.
    """
    out: dict[str, str] = {}
    for key, value in labels.items():
        if not _LABEL_RE.match(key) or not _LABEL_RE.match(value):
            raise Bug(f"label {key}={value!r} must match [A-Za-z0-9._:/-]{{1,128}} on both sides")
        out[key] = value
    if need_installation and LABEL_INSTALLATION not in out:
        raise Bug(f"the label {LABEL_INSTALLATION} is required: a reaper must never see an instance without it")
    return out


def labels_match(have: Mapping[str, str], want: Mapping[str, str]) -> bool:
    """Whether ``have`` includes every pair of ``want``."""
    return all(have.get(k) == v for k, v in want.items())


def encode_labels(labels: Mapping[str, str]) -> str:
    """``{"a": "1", "b": "2"}`` -> ``"a=1,b=2"`` (sorted), for providers with one label string."""
    return ",".join(f"{k}={v}" for k, v in sorted(check_labels(labels, need_installation=False).items()))


def decode_labels(text: str | None) -> dict[str, str]:
    """The inverse of ``encode_labels``; pairs that do not parse are ignored (a foreign label)."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        key, sep, value = part.partition("=")
        if sep and _LABEL_RE.match(key) and _LABEL_RE.match(value):
            out[key] = value
    return out


class InstanceRequest(BaseModel):
    """What ``create_instance`` needs besides the offer.

    ``ssh_public_key`` is the run's public key (OpenSSH one-line form); it is the only key the
    box will accept for the box's user (the ssh provider, whose machines are the user's own,
    logs in with the machine's configured key instead: see ``SshEndpoint.key_path``).
    ``env`` is set for every command on the box: never put a user secret there, a rented box is
    untrusted. ``start_command`` runs once, detached, in the box's working folder after it
    boots. ``image`` and ``disk_gb`` matter to providers that run images (vast.ai); local and
    ssh boxes ignore them. ``bid_price`` asks for an interruptible instance at that $/h where
    the provider offers one (``None``: on demand).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    ssh_public_key: str
    labels: dict[str, str]
    image: str | None = None
    disk_gb: float | None = Field(default=None, gt=0)
    env: dict[str, str] = Field(default_factory=dict)
    start_command: str | None = None
    bid_price: float | None = Field(default=None, gt=0)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        return check_labels(v)

    @field_validator("ssh_public_key")
    @classmethod
    def _public_key(cls, v: str) -> str:
        line = " ".join(v.split())
        parts = line.split(" ")
        if len(parts) < 2 or not parts[0].startswith(("ssh-", "ecdsa-", "sk-")):
            raise ValueError("ssh_public_key must be one OpenSSH public key line ('ssh-ed25519 AAAA... comment')")
        if "PRIVATE KEY" in v:
            raise ValueError("ssh_public_key holds a private key; pass the public key only")
        return line

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise ValueError(f"environment variable name {key!r} is not a shell name")
        return v


class Instance(BaseModel):
    """One instance as ``list_instances`` reports it."""

    model_config = ConfigDict(extra="ignore")

    provider: str
    instance_id: str
    state: InstanceState
    labels: dict[str, str] = Field(default_factory=dict)
    offer_id: str | None = None
    host_id: str | None = None
    price_per_hour: float | None = None
    created_at: datetime | None = None
    pid: int | None = None
    message: str | None = None


class SshEndpoint(BaseModel):
    """How to reach an instance over SSH.

    ``workdir``: the folder commands should run in and relative SFTP paths resolve against
    (``~/...`` means under the login's home); ``None`` means the login's home.
    ``env``: exported before every command (the ssh provider marks its processes with
    ``CHOLINE_SSH_INSTANCE=<instance id>`` this way so that destroy finds them).
    ``host_key``: the server's public host key when the provider knows it out of band (local
    boxes); it is then required exactly. Otherwise the first key seen is pinned under
    ``host_key_alias`` and required from then on.
    ``key_path``: log in with this private key file instead of the run's key (the ssh provider:
    the user's own key for their own machine).
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    host: str
    port: int = Field(ge=1, le=65535)
    user: str
    workdir: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    host_key: str | None = None
    host_key_alias: str | None = None
    key_path: str | None = None

    @property
    def pin_name(self) -> str:
        """The name the host key is pinned under."""
        return self.host_key_alias or f"[{self.host}]:{self.port}"


class Provider(ABC):
    """A source of boxes. One module per provider; a shared contract test suite for all.

    Subclasses implement the abstract methods; ``search_offers`` (ranking) and
    ``wait_until_running`` are the same for everyone. Every method is safe to call again after
    a crash or a redelivered request: ``destroy_instance`` of a gone instance returns quietly,
    ``status`` of an unknown id is ``gone``.
    """

    name: ClassVar[str]

    @abstractmethod
    async def fetch_offers(self, spec: GpuSpec, filters: OfferFilters) -> list[Offer]:
        """Candidate offers for ``spec``, in any order; may include ones that do not qualify.

        A provider narrows the search on its side where it can (query the spec and floors);
        ``search_offers`` applies the spec and every filter again and ranks. No offers is an
        empty list, not an error; a provider that cannot be asked raises ``ProviderError``.
        """

    async def search_offers(self, spec: GpuSpec, filters: OfferFilters | None = None) -> list[Offer]:
        """Offers that satisfy ``spec`` and ``filters``, best first (see ``offers.rank_offers``)."""
        f = filters or OfferFilters()
        return rank_offers(await self.fetch_offers(spec, f), spec, f)

    @abstractmethod
    async def create_instance(self, offer: Offer, request: InstanceRequest) -> str:
        """Rent ``offer`` and return the new instance's id, without waiting for it to boot.

        Raises ``NoCapacity`` when the offer is no longer available (take another) and
        ``ProvisioningFailed`` when the provider tried and failed. The instance carries
        ``request.labels`` (with the installation label, always) from the moment it exists.
        """

    @abstractmethod
    async def status(self, instance_id: str) -> InstanceState:
        """The instance's normalised state; ``gone`` for an id the provider does not know.

        Raises ``ProviderError`` only when the provider itself cannot be asked (a network error
        to its API); a machine that cannot be reached is ``offline``, not an exception.
        """

    @abstractmethod
    async def ssh_endpoint(self, instance_id: str) -> SshEndpoint:
        """Where to SSH into a running instance.

        Raises ``NotYetReady`` while it is loading and ``InstanceUnavailable`` when it is
        exited, offline or gone.
        """

    @abstractmethod
    async def destroy_instance(self, instance_id: str) -> None:
        """Destroy the instance and everything it ran; stop billing.

        Idempotent: a gone or unknown instance is not an error. Returns once the provider has
        accepted the destruction. Raises ``ProviderError`` (retry later) when the provider or
        the machine cannot be reached to do it.
        """

    @abstractmethod
    async def list_instances(self, labels: Mapping[str, str]) -> list[Instance]:
        """This provider's instances whose labels include every pair of ``labels``.

        ``labels`` must hold the installation label (``Bug`` otherwise): a listing without it
        could hand a reaper the user's other machines. Destroyed instances are not listed.
        """

    async def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release clients and connections the provider holds."""

    async def wait_until_running(
        self, instance_id: str, *, timeout: float = 300.0, interval: float = 1.0
    ) -> SshEndpoint:
        """Poll ``status`` until ``running`` and return the SSH endpoint.

        Raises ``ProvisioningFailed`` when the instance exits, goes offline or disappears, or
        stays loading past ``timeout``; the caller destroys it and takes another offer.
        """
        deadline = time.monotonic() + timeout
        state = InstanceState.UNKNOWN
        delay = min(0.05, interval)
        while True:
            state = await self.status(instance_id)
            if state is InstanceState.RUNNING:
                try:
                    return await self.ssh_endpoint(instance_id)
                except NotYetReady:
                    pass
            elif state in (InstanceState.EXITED, InstanceState.OFFLINE, InstanceState.GONE):
                raise ProvisioningFailed(
                    f"{self.name} instance {instance_id} is {state.value} before it ever ran",
                    detail={"instance_id": instance_id, "state": state.value},
                )
            if time.monotonic() >= deadline:
                raise ProvisioningFailed(
                    f"{self.name} instance {instance_id} still {state.value} after {timeout:g}s",
                    hint="the provider is slow or the host is stuck; destroy it and take another offer",
                    detail={"instance_id": instance_id, "state": state.value},
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, interval)
