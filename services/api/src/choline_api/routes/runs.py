"""``/v1/runs``: create, list, get, control; checkpoints and artifacts of a run."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Header, Query, status

from choline_core.events import RunSpec, RunState

from ..deps import CurrentUser, GatewayDep
from ..models import (
    ArtifactPage,
    AttemptPage,
    CheckpointPage,
    ControlCreate,
    ControlPublic,
    FindingPage,
    RunPage,
    RunPublic,
    StreamTokenCreated,
)

router = APIRouter(prefix="/runs", tags=["runs"])


@router.post("", status_code=status.HTTP_202_ACCEPTED, summary="queue a run")
async def create_run(
    spec: RunSpec,
    user: CurrentUser,
    gateway: GatewayDep,
    idempotency_key: Annotated[
        str | None, Header(max_length=128, description="a retry with the same key queues nothing new")
    ] = None,
) -> RunPublic:
    """Validate the spec (GPU spec, provider), assign a run id and publish ``RunRequested`` to the
    provisioner. Answers 202 with the run in state ``queued``."""
    return await gateway.create_run(user, spec, idempotency_key)


@router.get("", summary="list your runs, newest first")
async def list_runs(
    user: CurrentUser,
    gateway: GatewayDep,
    state: Annotated[list[RunState] | None, Query(description="only runs in these states")] = None,
    name: Annotated[str | None, Query(max_length=256, description="name contains")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Annotated[datetime | None, Query(description="runs created before this (paging: next_before)")] = None,
) -> RunPage:
    return await gateway.list_runs(user, states=state or [], name=name, limit=limit, before=before)


@router.get("/{run_id}", summary="one run: state, attempts, cost")
async def get_run(run_id: str, user: CurrentUser, gateway: GatewayDep) -> RunPublic:
    return await gateway.get_run(user, run_id)


@router.post("/{run_id}/control", status_code=status.HTTP_202_ACCEPTED, summary="pause, resume, stop, cancel or set")
async def control_run(run_id: str, body: ControlCreate, user: CurrentUser, gateway: GatewayDep) -> ControlPublic:
    """Publish a control command for the run; the provisioner and the box's agent act on it.
    ``set`` takes ``params`` such as ``{"lr": 3e-4, "epochs": "+5"}``."""
    return await gateway.control(user, run_id, body.action, body.params)


@router.get("/{run_id}/checkpoints", summary="the run's checkpoints, newest first")
async def list_checkpoints(
    run_id: str, user: CurrentUser, gateway: GatewayDep, include_deleted: bool = False
) -> CheckpointPage:
    """``include_deleted``: also those retention has removed from object storage."""
    return await gateway.checkpoints(user, run_id, include_deleted)


@router.get("/{run_id}/artifacts", summary="the run's artifacts, model bundle and logs, with download URLs")
async def list_artifacts(run_id: str, user: CurrentUser, gateway: GatewayDep) -> ArtifactPage:
    return await gateway.artifacts(user, run_id)


@router.get("/{run_id}/attempts", summary="the run's attempts: box, host, price, start/end, why each ended, cost")
async def list_attempts(run_id: str, user: CurrentUser, gateway: GatewayDep) -> AttemptPage:
    return await gateway.attempts(user, run_id)


@router.get("/{run_id}/findings", summary="what the monitor found in the run (divergence, stalls...), newest first")
async def list_run_findings(
    run_id: str, user: CurrentUser, gateway: GatewayDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> FindingPage:
    return await gateway.findings(user, run_id, limit)


@router.post(
    "/{run_id}/stream-token",
    status_code=status.HTTP_201_CREATED,
    summary="a short-lived token to follow this run's logs and metrics from a browser (EventSource)",
)
async def create_stream_token(run_id: str, user: CurrentUser, gateway: GatewayDep) -> StreamTokenCreated:
    """``EventSource`` cannot send an ``Authorization`` header: pass this token as
    ``?stream_token=`` to ``/logs?follow=1`` and ``/metrics/follow`` of this run instead. It is
    valid for ``CHOLINE_API_STREAM_TOKEN_TTL`` seconds (default 600), for this run only, read-only,
    and dies with the bearer token it was made from."""
    return await gateway.stream_token(user, run_id)
