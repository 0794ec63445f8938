"""The deploy service's own tables (migrations ``deploy_0002``, ``deploy_0003``).

- ``deploy_deployment``: one row per (owner, name): the model and version it serves, the previous version
  (for ``rollback``), its settings and state;
- ``deploy_replica``: one row per serving process: where it listens, its pid (local) and how often it was
  restarted. A restarted deploy service adopts the replicas whose process still answers.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import Column, DateTime, Text
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def aware(dt: datetime | None) -> datetime | None:
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    return dt


class DeploymentRow(SQLModel, table=True):
    __tablename__ = "deploy_deployment"

    owner: str = Field(primary_key=True, max_length=128)
    name: str = Field(primary_key=True, max_length=128)
    model: str = Field(max_length=128)
    version: int
    previous_version: int | None = None
    state: str = Field(max_length=32)
    reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    config: str = Field(sa_column=Column(Text, nullable=False))  # JSON: DeployConfig
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    updated_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class ReplicaRow(SQLModel, table=True):
    __tablename__ = "deploy_replica"

    replica_id: str = Field(primary_key=True, max_length=64)
    owner: str = Field(max_length=128)
    name: str = Field(max_length=128)
    version: int
    state: str = Field(max_length=32)
    url: str | None = Field(default=None, max_length=512)
    pid: int | None = None
    box_id: str | None = Field(default=None, max_length=128)
    run_id: str | None = Field(default=None, max_length=128)  # a replica on a rented box: its serving run
    restarts: int = 0
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    started_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
