"""The event envelope and the typed events choline's processes exchange.

Every NATS message is an ``Envelope``: ``{id, type, version, ts, run_id?, box_id?, data}``.
``id`` doubles as the JetStream ``Nats-Msg-Id`` for deduplication, so handlers must be
idempotent. Logs and metrics also carry ``(attempt, seq)`` because JetStream's dedup
window is minutes and an agent's replay after a night offline is hours.

Writers are strict, readers lenient: constructing an event with an unknown field raises,
while ``Envelope.parse()``/``Envelope.event()`` drop fields they do not know, so a newer
writer never breaks an older reader (the open-world assumption).
"""

from __future__ import annotations

import builtins
import json
import uuid
from datetime import datetime, timezone
from enum import Enum
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

E = TypeVar("E", bound="Event")


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Model(BaseModel):
    """Strict when built in code, lenient when parsed with ``context={"lenient": True}``."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_unknown_when_lenient(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and info.context and info.context.get("lenient"):
            known = set(cls.model_fields)
            known |= {f.alias for f in cls.model_fields.values() if f.alias}
            return {k: v for k, v in data.items() if k in known}
        return data


_REGISTRY: dict[str, type[Event]] = {}


class Event(Model):
    """A typed payload. Subclasses set ``TYPE`` (and bump ``VERSION`` on incompatible change)."""

    TYPE: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TYPE:
            if cls.TYPE in _REGISTRY and _REGISTRY[cls.TYPE].__qualname__ != cls.__qualname__:
                raise TypeError(f"event type {cls.TYPE!r} registered twice")
            _REGISTRY[cls.TYPE] = cls

    def envelope(self, *, run_id: str | None = None, box_id: str | None = None, id: str | None = None) -> Envelope:
        """Wrap this event. ``run_id``/``box_id`` default to the event's own fields of that name."""
        run_id = run_id or getattr(self, "run_id", None)
        box_id = box_id or getattr(self, "box_id", None)
        return Envelope(
            id=id or new_id(),
            type=self.TYPE,
            version=self.VERSION,
            run_id=run_id,
            box_id=box_id,
            data=self.model_dump(mode="json"),
        )


def event_type(name: str) -> type[Event] | None:
    return _REGISTRY.get(name)


def registered_events() -> dict[str, type[Event]]:
    return dict(_REGISTRY)


class Envelope(Model):
    id: str = Field(default_factory=new_id)
    type: str
    version: int = 1
    ts: datetime = Field(default_factory=utcnow)
    run_id: str | None = None
    box_id: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def parse(cls, raw: bytes | str | dict[str, Any]) -> Envelope:
        """Read an envelope leniently (unknown fields dropped). Raises ``ValueError`` if it is not one."""
        if isinstance(raw, (bytes, str)):
            raw = json.loads(raw)
        return cls.model_validate(raw, context={"lenient": True})

    def event(self, expected: builtins.type[E] | None = None) -> E:
        """The typed event inside. ``expected`` checks the type; otherwise the registry decides."""
        cls: builtins.type[Event] | None = expected or event_type(self.type)
        if cls is None:
            raise ValueError(f"unknown event type {self.type!r}")
        if expected is not None and self.type != expected.TYPE:
            raise ValueError(f"expected a {expected.TYPE!r} event, got {self.type!r}")
        return cls.model_validate(self.data, context={"lenient": True})  # type: ignore[return-value]


# =============================================================================================
# Run lifecycle
# =============================================================================================
class RunState(str, Enum):
    queued = "queued"
    scheduled = "scheduled"
    provisioning = "provisioning"
    syncing = "syncing"
    running = "running"
    pausing = "pausing"
    paused = "paused"
    recovering = "recovering"
    finishing = "finishing"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (RunState.succeeded, RunState.failed, RunState.cancelled)


class DataMount(Model):
    name: str
    manifest: str | None = None  # dataset manifest digest
    local_path: str | None = None


class RunSpec(Model):
    """What a user asked to run; shipped from the CLI through the gateway to the provisioner."""

    name: str | None = None
    project: str | None = None
    script: str
    args: list[str] = Field(default_factory=list)
    gpus: str = "1xcpu"
    provider: str = "local"
    code_digest: str | None = None
    env_digest: str | None = None
    data: list[DataMount] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    max_price: float | None = None  # $/h
    budget: float | None = None  # $ total
    start_at: datetime | None = None
    retries: int = 0
    distributed: bool = False
    max_attempts: int = 10


class RunRequested(Event):
    TYPE: ClassVar[str] = "run.requested"
    run_id: str
    owner: str = "admin"
    spec: RunSpec


class RunStateChanged(Event):
    TYPE: ClassVar[str] = "run.state_changed"
    run_id: str
    state: RunState
    previous: RunState | None = None
    reason: str | None = None
    attempt: int | None = None


class AttemptStarted(Event):
    """Published by the agent once it knows where the attempt starts: ``resumed_from_step`` is the
    checkpoint's step it restored (0 when the attempt starts from scratch). This attempt owns the
    steps after it; earlier attempts' points beyond it are superseded (one history)."""

    TYPE: ClassVar[str] = "attempt.started"
    run_id: str
    attempt: int
    box_id: str
    resumed_from_step: int = 0
    checkpoint: str | None = None


class AttemptEnded(Event):
    TYPE: ClassVar[str] = "attempt.ended"
    run_id: str
    attempt: int
    box_id: str | None = None
    reason: str
    exit_code: int | None = None
    last_step: int | None = None
    cost: float = 0.0
    traceback_tail: str | None = None


class ControlAction(str, Enum):
    pause = "pause"
    resume = "resume"
    stop = "stop"
    set = "set"
    cancel = "cancel"


class ControlApplied(Event):
    """The training library applied (``ack["ok"]``) or refused a control command at ``(step, tick)``:
    what a later attempt replays when it resumes from a checkpoint older than the change. ``ack`` is
    the library's ``control_ack`` (see ``choline_core.agent_protocol.ControlAck``)."""

    TYPE: ClassVar[str] = "run.control_applied"
    run_id: str
    attempt: int
    ack: dict[str, Any]


class ControlCommand(Event):
    """A user's command to a run. ``params`` for ``set``: ``{"lr": 3e-4, "epochs": "+5"}``."""

    TYPE: ClassVar[str] = "run.control"
    run_id: str
    action: ControlAction
    params: dict[str, Any] = Field(default_factory=dict)
    by: str | None = None


# =============================================================================================
# Boxes
# =============================================================================================
class GpuReport(Model):
    index: int
    name: str | None = None
    util: float | None = None  # 0..100
    mem_used_mb: float | None = None
    mem_total_mb: float | None = None


class Heartbeat(Event):
    TYPE: ClassVar[str] = "box.heartbeat"
    box_id: str
    run_id: str | None = None
    attempt: int | None = None
    agent_version: str
    seq: int = 0
    step: int | None = None
    phase: str | None = None  # fetching | installing | training | uploading | idle
    cpu_percent: float | None = None
    mem_used_mb: float | None = None
    gpus: list[GpuReport] = Field(default_factory=list)


class BoxEvent(Event):
    """Box lifecycle: created, ready, lost, destroyed (``kind``), with the reason."""

    TYPE: ClassVar[str] = "box.event"
    box_id: str
    run_id: str | None = None
    kind: str
    provider: str | None = None
    instance_id: str | None = None
    host: str | None = None
    price_per_hour: float | None = None
    reason: str | None = None


# =============================================================================================
# Logs and metrics (carry attempt + seq for long-horizon dedup)
# =============================================================================================
class LogLine(Model):
    seq: int
    ts: datetime = Field(default_factory=utcnow)
    stream: str = "stdout"  # stdout | stderr | agent
    text: str


class LogBatch(Event):
    TYPE: ClassVar[str] = "run.logs"
    run_id: str
    attempt: int
    lines: list[LogLine]


class MetricPoint(Model):
    seq: int
    step: int
    key: str
    value: float | None  # None encodes NaN/inf lost in JSON; see ``raw``
    raw: str | None = None  # "nan", "inf", "-inf" when value is not finite
    ts: datetime = Field(default_factory=utcnow)
    epoch: int | None = None


class MetricBatch(Event):
    TYPE: ClassVar[str] = "run.metrics"
    run_id: str
    attempt: int
    points: list[MetricPoint]


# =============================================================================================
# Checkpoints and artifacts
# =============================================================================================
class CheckpointFile(Model):
    path: str
    size: int
    sha256: str


class CheckpointUploaded(Event):
    """The agent uploaded a checkpoint's files and its manifest (manifest last)."""

    TYPE: ClassVar[str] = "checkpoint.uploaded"
    run_id: str
    attempt: int
    step: int
    prefix: str
    files: list[CheckpointFile] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)
    reason: str = "periodic"  # periodic | epoch | pause | final


class ArtifactsUploaded(Event):
    TYPE: ClassVar[str] = "artifacts.uploaded"
    run_id: str
    attempt: int
    prefix: str
    files: list[CheckpointFile] = Field(default_factory=list)
    bundle: str | None = None  # key of the model bundle tarball, when the run made one


# =============================================================================================
# Monitor and deploy
# =============================================================================================
class Severity(str, Enum):
    info = "info"
    warning = "warning"
    critical = "critical"


class FindingRaised(Event):
    TYPE: ClassVar[str] = "monitor.finding"
    finding_id: str
    run_id: str
    detector: str
    severity: Severity
    step: int | None = None
    message: str
    evidence: dict[str, Any] = Field(default_factory=dict)


class DeploymentChanged(Event):
    TYPE: ClassVar[str] = "deploy.changed"
    name: str
    version: str | None = None
    state: str
    url: str | None = None
    reason: str | None = None
    owner: str | None = None  # whose deployment (the gateway's webhooks deliver to this user's endpoints)
