"""The syncer's own tables (migration ``syncer_0002``).

- ``syncer_checkpoint``: one row per complete checkpoint a box uploaded, unique on (run, attempt, step).
  ``committed`` is true once the manifest was found in object storage; ``deleted_at`` is set when
  retention removed the objects (the row stays, for the run's history).
- ``syncer_artifact``: one row per file a run brought back, unique on (run, path); a later attempt's
  file of the same path replaces the earlier one (as the object does).
- ``syncer_box_endpoint``: the read model of ``BoxEndpoints`` events: the S3 endpoint each attempt's
  box reaches, so presigned URLs are signed for the host and port the box uses.
- ``syncer_dataset_pack`` / ``syncer_dataset_chunk``: verified packfiles and where each chunk sits in them
  (the deduplication index); ``syncer_dataset_version``: every commit of a dataset (owner, name, manifest).
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import Boolean, Column, DateTime, Text
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def aware(dt: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; they were stored in UTC."""
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    return dt


class CheckpointRow(SQLModel, table=True):
    __tablename__ = "syncer_checkpoint"

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(max_length=128)
    attempt: int
    step: int
    prefix: str = Field(max_length=512)
    reason: str = Field(default="periodic", max_length=32)
    files: str = Field(sa_column=Column(Text, nullable=False))  # JSON: [{path, size, sha256}]
    size: int = 0
    metrics: str = Field(sa_column=Column(Text, nullable=False))  # JSON: {key: value}
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    committed: bool = Field(default=False, sa_column=Column(Boolean, nullable=False, default=False))
    deleted_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))


class ArtifactRow(SQLModel, table=True):
    __tablename__ = "syncer_artifact"

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(max_length=128)
    path: str = Field(max_length=1024)
    attempt: int
    size: int
    sha256: str = Field(max_length=64)
    key: str = Field(max_length=1200)
    bundle: bool = Field(default=False, sa_column=Column(Boolean, nullable=False, default=False))
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class BoxEndpointRow(SQLModel, table=True):
    __tablename__ = "syncer_box_endpoint"

    run_id: str = Field(primary_key=True, max_length=128)
    attempt: int = Field(primary_key=True)
    box_id: str | None = Field(default=None, max_length=128)
    s3_endpoint: str = Field(max_length=512)
    updated_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class DatasetPackRow(SQLModel, table=True):
    """A packfile the syncer read back and checked; its chunks are in ``syncer_dataset_chunk``."""

    __tablename__ = "syncer_dataset_pack"

    digest: str = Field(primary_key=True, max_length=64)
    size: int
    chunks: int
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class DatasetChunkRow(SQLModel, table=True):
    """Where a chunk is stored: (sha256, pack) -> offset and length. A chunk may sit in several packs."""

    __tablename__ = "syncer_dataset_chunk"

    sha: str = Field(primary_key=True, max_length=64)
    pack: str = Field(primary_key=True, max_length=64)
    pos: int  # offset in the pack
    length: int


class DatasetVersionRow(SQLModel, table=True):
    """One commit of a dataset: the newest row of (owner, name) is its current version."""

    __tablename__ = "syncer_dataset_version"

    id: int | None = Field(default=None, primary_key=True)
    owner: str = Field(max_length=128)
    name: str = Field(max_length=128)
    manifest: str = Field(max_length=64)
    size: int
    files: int
    chunks: int
    packs: str = Field(sa_column=Column(Text, nullable=False))  # JSON list of pack digests
    source: str | None = Field(default=None, max_length=1024)
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class ControlRow(SQLModel, table=True):
    """A control command an attempt's training library applied or refused (``syncer_0004``)."""

    __tablename__ = "syncer_control"

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(max_length=128)
    control_id: str = Field(max_length=128)
    attempt: int
    step: int
    tick: int = 0
    ok: bool = Field(default=False, sa_column=Column(Boolean, nullable=False))
    ack: str = Field(sa_column=Column(Text, nullable=False))  # JSON: the library's control_ack
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
