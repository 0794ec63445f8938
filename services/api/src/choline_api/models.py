"""The api service's own tables (migration ``api_0002``) and the public shapes of its HTTP API.

Tables (SQLModel ``table=True``; they never leave this service):

- ``api_user``: a user; ``id`` is the user's name (``admin``, ``alice``), the ``owner`` of runs.
- ``api_token``: bearer tokens, stored as the sha256 of a 256-bit random token (the token itself
  is shown once, at creation, and never stored, logged or published).
- ``api_run``: what this gateway submitted: run id, owner, spec, when. GET answers from it while
  the provisioner has not yet seen a just-created run, and access checks use its owner.
- ``api_run_state``: the last state of each run as heard on the run events stream (a read model
  of the provisioner's events: log followers learn from it when a run has ended).
- ``api_log_line`` / ``api_metric_point``: the logs and metrics store, unique on
  (run, attempt, seq) and (run, attempt, seq, key), so a replay hours later changes nothing.
  ``superseded`` marks points of an earlier attempt beyond the step a later attempt resumed from.
- ``api_attempt``: where each attempt resumed from (from ``AttemptStarted``): which points are superseded.
- ``api_metric_rollup``: min/max/last/count per bucket of 16, 256, 4096, 65536 steps (``metrics.py``).
- ``api_webhook`` / ``api_webhook_delivery`` / ``api_webhook_attempt``: a user's webhook endpoints
  (URL and signing secret encrypted with the gateway's key), each event to deliver to one, and
  each try (``webhooks.py``).

HTTP models follow the ``*Create`` / ``*Public`` split: the database shape never leaks.
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from pydantic import Field as PField
from sqlmodel import Field, SQLModel

from choline_core.events import ControlAction, RunSpec, RunState
from choline_core.pipeline import CheckpointInfo, LogInfo
from choline_core.rpc import AttemptInfo, RunInfo

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER keys only


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def aware(dt: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; they were stored in UTC."""
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    return dt


def _ts() -> Any:
    return sa.Column(sa.DateTime(timezone=True), nullable=False)


def _ts_null() -> Any:
    return sa.Column(sa.DateTime(timezone=True), nullable=True)


# =============================================================================================
# Tables
# =============================================================================================
class UserRow(SQLModel, table=True):
    __tablename__ = "api_user"

    id: str = Field(primary_key=True, max_length=64)
    is_admin: bool = False
    created_at: datetime = Field(sa_column=_ts())


class TokenRow(SQLModel, table=True):
    __tablename__ = "api_token"

    id: str = Field(primary_key=True, max_length=16)
    user_id: str = Field(max_length=64, index=True)
    name: str = Field(max_length=128)
    token_hash: str = Field(max_length=64, unique=True)
    prefix: str = Field(max_length=16)
    created_at: datetime = Field(sa_column=_ts())
    last_used_at: datetime | None = Field(default=None, sa_column=_ts_null())
    revoked_at: datetime | None = Field(default=None, sa_column=_ts_null())


class RunRow(SQLModel, table=True):
    __tablename__ = "api_run"
    __table_args__ = (sa.UniqueConstraint("owner", "client_key", name="uq_api_run_client_key"),)

    run_id: str = Field(primary_key=True, max_length=64)
    owner: str = Field(max_length=64, index=True)
    name: str | None = Field(default=None, max_length=256)
    spec: str = Field(sa_column=sa.Column(sa.Text, nullable=False))  # RunSpec JSON
    client_key: str | None = Field(default=None, max_length=128)
    created_at: datetime = Field(sa_column=_ts())


class RunStateRow(SQLModel, table=True):
    __tablename__ = "api_run_state"

    run_id: str = Field(primary_key=True, max_length=64)
    state: str = Field(max_length=16)
    reason: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    attempt: int | None = None
    updated_at: datetime = Field(sa_column=_ts())  # the event's timestamp (older events never win)
    ever_running: bool = Field(
        default=False, sa_column=sa.Column(sa.Boolean, nullable=False, server_default=sa.false())
    )
    recovering: bool = Field(default=False, sa_column=sa.Column(sa.Boolean, nullable=False, server_default=sa.false()))


class LogLineRow(SQLModel, table=True):
    __tablename__ = "api_log_line"
    __table_args__ = (sa.UniqueConstraint("run_id", "attempt", "seq", name="uq_api_log_line"),)

    id: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True, autoincrement=True))
    run_id: str = Field(max_length=64)
    attempt: int
    seq: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    ts: datetime = Field(sa_column=_ts())
    stream: str = Field(max_length=8)
    text: str = Field(sa_column=sa.Column(sa.Text, nullable=False))


class MetricPointRow(SQLModel, table=True):
    __tablename__ = "api_metric_point"
    __table_args__ = (
        sa.UniqueConstraint("run_id", "attempt", "seq", "key", name="uq_api_metric_point"),
        sa.Index("ix_api_metric_point_series", "run_id", "key", "step"),
    )

    id: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True, autoincrement=True))
    run_id: str = Field(max_length=64)
    key: str = Field(max_length=200)
    attempt: int
    seq: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    step: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    value: float | None = None
    raw: str | None = Field(default=None, max_length=8)
    ts: datetime = Field(sa_column=_ts())
    epoch: int | None = None
    superseded: bool = Field(default=False, sa_column=sa.Column(sa.Boolean, nullable=False, server_default=sa.false()))


class AttemptRow(SQLModel, table=True):
    __tablename__ = "api_attempt"

    run_id: str = Field(primary_key=True, max_length=64)
    attempt: int = Field(primary_key=True)
    resumed_from_step: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    box_id: str | None = Field(default=None, max_length=64)
    started_at: datetime = Field(sa_column=_ts())


class WebhookRow(SQLModel, table=True):
    __tablename__ = "api_webhook"

    id: str = Field(primary_key=True, max_length=16)
    owner: str = Field(max_length=64, index=True)
    url_enc: str = Field(sa_column=sa.Column(sa.Text, nullable=False))  # SecretBox-sealed: a URL can hold a token
    url_display: str = Field(max_length=300)  # scheme://host/first-segment/... (safe to show and log)
    secret_enc: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    events: str = Field(sa_column=sa.Column(sa.Text, nullable=False))  # JSON list
    format: str = Field(max_length=16)
    description: str | None = Field(default=None, max_length=256)
    created_at: datetime = Field(sa_column=_ts())
    deleted_at: datetime | None = Field(default=None, sa_column=_ts_null())


class DeliveryRow(SQLModel, table=True):
    __tablename__ = "api_webhook_delivery"
    __table_args__ = (sa.UniqueConstraint("webhook_id", "event_id", name="uq_api_webhook_delivery_event"),)

    id: str = Field(primary_key=True, max_length=16)
    webhook_id: str = Field(max_length=16)
    event_id: str = Field(max_length=128)
    event_type: str = Field(max_length=32)
    body: str = Field(sa_column=sa.Column(sa.Text, nullable=False))  # the exact bytes sent, every try
    state: str = Field(max_length=12)  # pending | delivered | failed | cancelled
    attempts: int = 0
    next_at: datetime | None = Field(default=None, sa_column=_ts_null())
    claimed_until: datetime | None = Field(default=None, sa_column=_ts_null())
    last_status: int | None = None
    last_error: str | None = Field(default=None, max_length=300)
    created_at: datetime = Field(sa_column=_ts())
    finished_at: datetime | None = Field(default=None, sa_column=_ts_null())


class DeliveryAttemptRow(SQLModel, table=True):
    __tablename__ = "api_webhook_attempt"

    id: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True, autoincrement=True))
    delivery_id: str = Field(max_length=16)
    n: int
    at: datetime = Field(sa_column=_ts())
    status: int | None = None
    error: str | None = Field(default=None, max_length=300)
    duration_ms: int


# =============================================================================================
# HTTP models
# =============================================================================================
class ApiModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(ApiModel):
    """Every failure's body: ``type`` names the error (``not_found``, ``bad_spec``, ...)."""

    type: str
    message: str
    detail: Any = None


class MePublic(ApiModel):
    user: str
    admin: bool
    token_id: str
    token_name: str


class TokenCreate(ApiModel):
    name: str = PField(min_length=1, max_length=128)
    user: str | None = PField(
        default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$", description="admin only: for whom"
    )
    admin: bool = PField(default=False, description="admin only: make a new user an admin")


class TokenPublic(ApiModel):
    id: str
    name: str
    user: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


class TokenCreated(TokenPublic):
    token: str = PField(description="the bearer token; shown once, stored only as a hash")


class RunPublic(ApiModel):
    run_id: str
    owner: str
    name: str | None = None
    state: RunState
    reason: str | None = None
    spec: RunSpec
    created_at: datetime
    updated_at: datetime
    attempts: list[AttemptInfo] = PField(default_factory=list)
    cost: float = 0.0
    gpus: str | None = None
    provider: str | None = None

    @classmethod
    def from_info(cls, info: RunInfo) -> RunPublic:
        return cls.model_validate(info.model_dump(include=set(cls.model_fields)))  # a newer RunInfo may hold more


class RunPage(ApiModel):
    runs: list[RunPublic]
    next_before: datetime | None = PField(default=None, description="pass as ?before= for the next page")


class ControlCreate(ApiModel):
    action: ControlAction
    params: dict[str, Any] = PField(default_factory=dict)


class ControlPublic(ApiModel):
    command_id: str
    run_id: str
    action: ControlAction
    params: dict[str, Any]


class LogLinePublic(ApiModel):
    id: int
    attempt: int
    seq: int
    ts: datetime
    stream: str
    text: str


class LogPage(ApiModel):
    run_id: str
    lines: list[LogLinePublic]
    more: bool = PField(description="true when the page is full: ask again after the last line")
    next_attempt: int | None = None
    next_seq: int | None = None


class MetricPointPublic(ApiModel):
    key: str
    step: int
    value: float | None
    raw: str | None = None
    attempt: int
    seq: int
    ts: datetime
    epoch: int | None = None
    superseded: bool = False


class MetricPage(ApiModel):
    run_id: str
    points: list[MetricPointPublic]
    more: bool = False
    next_after_step: int | None = None


class MetricKeys(ApiModel):
    run_id: str
    keys: list[str]


class CodeCreate(ApiModel):
    digest: str = PField(pattern=r"^[0-9a-f]{64}$", description="sha256 of the bundle or env spec, hex")
    kind: Literal["code", "env"] = "code"


class CodePublic(ApiModel):
    digest: str
    kind: Literal["code", "env"]
    key: str
    exists: bool
    url: str | None = PField(default=None, description="presigned PUT, when the object is missing")


class OfferPage(ApiModel):
    offers: list[dict[str, Any]]


class BoxPage(ApiModel):
    boxes: list[dict[str, Any]]


class CheckpointPage(ApiModel):
    run_id: str
    checkpoints: list[CheckpointInfo] = PField(description="newest step first")


class ArtifactFilePublic(ApiModel):
    path: str = PField(description="relative to the run's artifacts folder")
    size: int
    sha256: str | None = None
    attempt: int | None = None
    url: str | None = PField(default=None, description="presigned GET")


class ArtifactPage(ApiModel):
    run_id: str
    files: list[ArtifactFilePublic] = PField(description="every artifact but the model bundle")
    bundle: ArtifactFilePublic | None = PField(default=None, description="the model bundle tarball, if any")
    logs: list[LogInfo] = PField(default_factory=list, description="each attempt's full output")


class AttemptPage(ApiModel):
    run_id: str
    attempts: list[AttemptInfo] = PField(description="oldest first: box, host, price, start/end, why it ended, cost")


class FindingPublic(BaseModel):
    """A monitor finding (read leniently: a newer monitor may add fields)."""

    model_config = ConfigDict(extra="ignore")
    id: str
    run_id: str
    attempt: int | None = None
    detector: str
    severity: str
    episode: int | None = None
    step: int | None = None
    ts: datetime | None = None
    message: str
    evidence: dict[str, Any] = PField(default_factory=dict)
    supersedes: str | None = None
    created_at: datetime | None = None
    advice: dict[str, Any] | None = None  # the advisor's answer in short (issue 15): GET /v1/runs/{id}/advice


class FindingPage(ApiModel):
    run_id: str | None = None
    findings: list[FindingPublic] = PField(description="newest first")


class SeriesPublic(ApiModel):
    """A chart series, columnar: entry *i* of every list is bucket *i* (a point when resolution is 1).
    ``step`` is the bucket's first step, ``last_step`` where ``last`` was logged; ``min``/``max``
    keep spikes; ``nonfinite`` counts NaN/inf values (they have no min/max)."""

    run_id: str
    key: str
    resolution: int = PField(description="steps per bucket (1: raw points; 0: raw points merged evenly)")
    source: str = PField(description="raw, raw-merged, or rollup-<steps> (xN when N buckets were merged)")
    start: int | None = None
    end: int | None = None
    step: list[int]
    last_step: list[int]
    min: list[float | None]
    max: list[float | None]
    last: list[float | None]
    count: list[int]
    nonfinite: list[int]


class StreamTokenCreated(ApiModel):
    token: str = PField(description="pass as ?stream_token= to this run's follow endpoints (EventSource)")
    run_id: str
    expires_at: datetime
    logs_url: str
    metrics_url: str


class WebhookEvent(str, Enum):
    run_started = "run.started"
    run_recovered = "run.recovered"
    run_paused = "run.paused"
    run_succeeded = "run.succeeded"
    run_failed = "run.failed"
    run_cancelled = "run.cancelled"
    finding_raised = "finding.raised"
    deployment_ready = "deployment.ready"


WebhookFormat = Literal["choline", "slack", "discord"]


class WebhookCreate(ApiModel):
    url: str = PField(min_length=8, max_length=2048, pattern=r"^https?://", description="http(s) URL to POST to")
    events: list[WebhookEvent] = PField(min_length=1, max_length=16)
    format: WebhookFormat = PField(default="choline", description="choline (signed JSON), slack or discord")
    description: str | None = PField(default=None, max_length=256)


class WebhookPublic(ApiModel):
    id: str
    owner: str
    url: str = PField(description="shown redacted: scheme://host/first-segment/... (the full URL may hold a token)")
    events: list[WebhookEvent]
    format: WebhookFormat
    description: str | None = None
    created_at: datetime
    pending: int = 0
    delivered: int = 0
    failed: int = 0


class WebhookCreated(WebhookPublic):
    secret: str = PField(description="the signing secret (whsec_...); shown once, here")


class DeliveryTryPublic(ApiModel):
    n: int
    at: datetime
    status: int | None = None
    error: str | None = None
    duration_ms: int


class DeliveryPublic(ApiModel):
    id: str
    event_id: str
    event_type: str
    state: Literal["pending", "delivered", "failed", "cancelled"]
    attempts: int
    next_at: datetime | None = None
    last_status: int | None = None
    last_error: str | None = None
    created_at: datetime
    finished_at: datetime | None = None
    tries: list[DeliveryTryPublic] = PField(default_factory=list)


class DeliveryPage(ApiModel):
    webhook_id: str
    deliveries: list[DeliveryPublic] = PField(description="newest first")
