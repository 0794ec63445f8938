"""The provisioner's own tables: runs, attempts, boxes, schedules.

No other service reads or writes these; they ask the provisioner over NATS (``choline_core.rpc``).
Every state change goes through a guarded update (``WHERE id = ? AND version = ?``), so a stale
or duplicate delivery, or a second replica, changes nothing.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlmodel import Field, SQLModel


def now() -> datetime:
    return datetime.now(timezone.utc)


def utc(ts: datetime | None) -> datetime | None:
    """Aware UTC (a naive time is taken to be UTC already)."""
    if ts is None:
        return None
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)


class Run(SQLModel, table=True):
    __tablename__ = "runs"

    id: str = Field(primary_key=True, max_length=64)
    owner: str = Field(index=True, max_length=128)
    name: str | None = Field(default=None, max_length=256)
    spec_json: str
    state: str = Field(index=True, max_length=32)
    reason: str | None = None
    attempts: int = 0  # number of attempts started
    retries_used: int = 0
    lost_hosts: str = "[]"  # JSON list of host ids this run lost (never rented again for it)
    pending_action: str | None = Field(default=None, max_length=32)  # pause | stop | cancel, awaiting the box
    start_at: datetime | None = None
    cost: float = 0.0
    created_at: datetime = Field(default_factory=now, index=True)
    updated_at: datetime = Field(default_factory=now)
    lease_owner: str | None = Field(default=None, max_length=64)
    lease_until: datetime | None = None
    version: int = 1


class Attempt(SQLModel, table=True):
    __tablename__ = "attempts"

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(index=True, max_length=64)
    n: int
    box_id: str | None = Field(default=None, max_length=64)
    started_at: datetime = Field(default_factory=now)
    running_at: datetime | None = None  # first heartbeat in the training phase
    ended_at: datetime | None = None
    end_reason: str | None = None
    exit_code: int | None = None
    traceback_tail: str | None = None
    resumed_from_step: int | None = None
    last_step: int | None = None
    cost: float = 0.0


class Box(SQLModel, table=True):
    __tablename__ = "boxes"

    id: str = Field(primary_key=True, max_length=64)  # choline's box id (label choline.box)
    run_id: str = Field(index=True, max_length=64)
    attempt: int
    provider: str = Field(max_length=32)
    state: str = Field(index=True, max_length=32)  # creating|created|booted|ready|releasing|destroyed|lost
    instance_id: str | None = Field(default=None, max_length=128)
    offer_id: str | None = Field(default=None, max_length=128)
    host_id: str | None = Field(default=None, max_length=256)
    price_per_hour: float = 0.0
    ssh_host: str | None = None
    ssh_port: int | None = None
    ssh_user: str | None = None
    workdir: str | None = None  # the attempt's folder on the box
    nats_port: int | None = None  # box-side port of the NATS tunnel
    s3_port: int | None = None  # box-side port of the S3 tunnel
    pid: int | None = None  # the agent's pid on the box
    reason: str | None = None
    created_at: datetime = Field(default_factory=now)
    ready_at: datetime | None = None
    destroyed_at: datetime | None = None
    last_heartbeat_at: datetime | None = None
    version: int = 1


class Schedule(SQLModel, table=True):
    """A run waiting for its start time or a price (``--at``, ``--max-price`` triggers)."""

    __tablename__ = "schedules"

    run_id: str = Field(primary_key=True, max_length=64)
    start_at: datetime | None = None
    max_price: float | None = None
    last_checked_at: datetime | None = None
    created_at: datetime = Field(default_factory=now)
