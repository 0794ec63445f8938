"""Request/reply contracts between the gateway and the services that own the data.

Core NATS request/reply on ``Subjects.rpc(service, method)`` (queue group = the service's
name). A reply is an envelope of the reply type, or of type ``error`` whose ``data`` is the
shared error body ``{type, message, detail}`` (see ``Bus.serve``); ``raise_for_error`` turns
that back into the matching ``CholineError``.

Provisioner (owns runs, attempts, boxes, schedules):
    ``get_run``      RunQuery(run_id)          -> RunInfo
    ``list_runs``    RunQuery(filters, paging) -> RunList
    ``offers``       OffersQuery               -> OfferList
    ``boxes``        BoxQuery                  -> BoxList

Monitor (owns findings):
    ``findings``     FindingsQuery(run_id?, limit) -> FindingList

The syncer's request/reply contracts (upload, checkpoints, artifacts) live in ``pipeline``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from pydantic import Field

from . import errors
from .events import Envelope, Event, Model, RunSpec, RunState

PROVISIONER = "provisioner"
SYNCER = "syncer"

# method names (the last token of ``Subjects.rpc(service, method)``)
GET_RUN = "get_run"
LIST_RUNS = "list_runs"
OFFERS = "offers"
BOXES = "boxes"


def raise_for_error(env: Envelope) -> Envelope:
    """Return ``env`` unless it is an error reply, which is raised as its ``CholineError`` type."""
    if env.type != "error":
        return env
    body = env.data or {}
    kind = body.get("type", "error")
    cls: type[errors.CholineError] = errors.CholineError
    for candidate in vars(errors).values():
        if isinstance(candidate, type) and issubclass(candidate, errors.CholineError) and candidate.kind == kind:
            cls = candidate
            break
    raise cls(str(body.get("message", "the service failed")), detail=body.get("detail"))


class AttemptInfo(Model):
    attempt: int
    box_id: str | None = None
    provider: str | None = None
    instance_id: str | None = None
    host: str | None = None
    price_per_hour: float | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    end_reason: str | None = None
    exit_code: int | None = None
    resumed_from_step: int | None = None
    last_step: int | None = None
    cost: float = 0.0
    error: str | None = None  # the traceback's tail, or what failed while setting the attempt up


class RunInfo(Event):
    TYPE: ClassVar[str] = "rpc.run"
    run_id: str
    owner: str
    name: str | None = None
    state: RunState
    reason: str | None = None
    spec: RunSpec
    created_at: datetime
    updated_at: datetime
    attempts: list[AttemptInfo] = Field(default_factory=list)
    cost: float = 0.0
    gpus: str | None = None
    provider: str | None = None


class RunQuery(Event):
    TYPE: ClassVar[str] = "rpc.run_query"
    run_id: str | None = None
    owner: str | None = None  # None = every owner (admin)
    states: list[RunState] = Field(default_factory=list)
    name: str | None = None  # substring match
    limit: int = 50
    before: datetime | None = None  # paging: runs created strictly before this


class RunList(Event):
    TYPE: ClassVar[str] = "rpc.run_list"
    runs: list[RunInfo]
    next_before: datetime | None = None


class OffersQuery(Event):
    TYPE: ClassVar[str] = "rpc.offers_query"
    gpus: str
    provider: str = "local"
    max_price: float | None = None
    limit: int = 20


class OfferList(Event):
    TYPE: ClassVar[str] = "rpc.offer_list"
    offers: list[dict[str, Any]]


class BoxQuery(Event):
    TYPE: ClassVar[str] = "rpc.box_query"
    owner: str | None = None
    include_destroyed: bool = False


class BoxList(Event):
    TYPE: ClassVar[str] = "rpc.box_list"
    boxes: list[dict[str, Any]]


# ---------------------------------------------------------------------------------------------
# Monitor (owns findings): ``<p>.rpc.monitor.findings``
# ---------------------------------------------------------------------------------------------
MONITOR = "monitor"
FINDINGS = "findings"


class FindingsQuery(Event):
    """``run_id`` None: every run's findings. The monitor answers the oldest ``limit`` (<= 1000)."""

    TYPE: ClassVar[str] = "rpc.findings_query"
    run_id: str | None = None
    limit: int = 100


class FindingList(Event):
    """The monitor's reply: each finding as the monitor's ``FindingPublic`` JSON."""

    TYPE: ClassVar[str] = "monitor.findings"
    findings: list[dict[str, Any]] = Field(default_factory=list)
