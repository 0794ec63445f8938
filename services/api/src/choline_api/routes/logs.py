"""``/v1/runs/{id}/logs`` (range, or server-sent events with ``follow=1``) and ``/metrics``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse

from choline_core.errors import BadSpec

from ..deps import CurrentUser, GatewayDep, StreamUser
from ..models import LogLinePublic, LogPage, MetricKeys, MetricPage, MetricPointPublic, SeriesPublic

router = APIRouter(prefix="/runs/{run_id}", tags=["logs and metrics"])

SSE_DOC = (
    "With `follow=1`: `text/event-stream`. `event: line` (id = the line's row id, data = a line), "
    "`event: state` when the run's state changes, `event: end` once the run has ended. "
    "A browser passes `?stream_token=` (POST /v1/runs/{id}/stream-token) instead of the bearer header."
)
METRICS_SSE_DOC = (
    "`text/event-stream` of new points (superseded ones never): `event: points` with "
    "`{points: {key: {step: [...], value: [...], raw: [...], attempt: [...]}}}` (id = `attempt:seq`, "
    "resume with `after=` or `Last-Event-ID`), `event: attempt` when a new attempt's points begin, "
    "`event: state`, and a last `event: end`. A browser passes `?stream_token=` instead of the header."
)


@router.get(
    "/logs",
    summary="the run's output: a page of lines, or a live stream with follow=1",
    description=SSE_DOC,
    response_model=LogPage,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def get_logs(
    run_id: str,
    user: StreamUser,
    gateway: GatewayDep,
    attempt: Annotated[int | None, Query(ge=0, description="only this attempt")] = None,
    after_seq: Annotated[int | None, Query(ge=-1, description="lines after this seq (cursor: next_seq)")] = None,
    after_attempt: Annotated[
        int | None, Query(ge=0, description="with after_seq across attempts (next_attempt)")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    follow: Annotated[bool, Query(description="stream new lines as server-sent events")] = False,
    after_id: Annotated[int, Query(ge=0, description="follow: start after this line id")] = 0,
    last_event_id: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Any:
    if follow:
        start = after_id
        if last_event_id and last_event_id.isdigit():
            start = max(start, int(last_event_id))
        events = await gateway.follow_logs(user, run_id, start)
        return StreamingResponse(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
    await gateway.ensure_access(user, run_id)
    rows = await gateway.db(
        gateway.store.log_lines, run_id, attempt=attempt, after_attempt=after_attempt, after_seq=after_seq, limit=limit
    )
    lines = [LogLinePublic.model_validate(r.model_dump(include=set(LogLinePublic.model_fields))) for r in rows]
    last = lines[-1] if lines else None
    return LogPage(
        run_id=run_id,
        lines=lines,
        more=len(lines) == limit,
        next_attempt=last.attempt if last else None,
        next_seq=last.seq if last else None,
    )


@router.get("/metrics", summary="metric points ordered by step (the run's history: superseded points hidden)")
async def get_metrics(
    run_id: str,
    user: CurrentUser,
    gateway: GatewayDep,
    key: Annotated[list[str] | None, Query(description="only these keys (repeat the parameter)")] = None,
    attempt: Annotated[int | None, Query(ge=0)] = None,
    include_superseded: bool = False,
    after_step: Annotated[int | None, Query(description="points after this step (cursor: next_after_step)")] = None,
    limit: Annotated[int, Query(ge=1, le=100000)] = 10000,
) -> MetricPage:
    await gateway.ensure_access(user, run_id)
    rows = await gateway.db(
        gateway.store.metric_points,
        run_id,
        keys=key or [],
        attempt=attempt,
        include_superseded=include_superseded,
        after_step=after_step,
        limit=limit + 1,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    next_after_step = None
    if more and rows:
        # never split a step across pages: cut back to the last complete step
        last_step = rows[-1].step
        complete = [r for r in rows if r.step < last_step]
        if complete:
            rows, next_after_step = complete, complete[-1].step
        else:
            next_after_step = last_step
    points = [MetricPointPublic.model_validate(r.model_dump(include=set(MetricPointPublic.model_fields))) for r in rows]
    return MetricPage(run_id=run_id, points=points, more=more, next_after_step=next_after_step)


@router.get("/metrics/keys", summary="the metric keys the run has logged")
async def get_metric_keys(run_id: str, user: CurrentUser, gateway: GatewayDep) -> MetricKeys:
    await gateway.ensure_access(user, run_id)
    keys = await gateway.db(gateway.metrics.keys, run_id)
    return MetricKeys(run_id=run_id, keys=keys)


@router.get(
    "/metrics/follow",
    summary="live metric points as server-sent events",
    description=METRICS_SSE_DOC,
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def follow_metrics(
    run_id: str,
    user: StreamUser,
    gateway: GatewayDep,
    key: Annotated[list[str] | None, Query(description="only these keys (repeat the parameter)")] = None,
    after: Annotated[str | None, Query(max_length=40, pattern=r"^\d+:\d+$", description="cursor attempt:seq")] = None,
    last_event_id: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> StreamingResponse:
    cursor = (0, -1)
    for value in (after, last_event_id):
        if value and value.count(":") == 1 and all(p.isdigit() for p in value.split(":")):
            a, s = (int(p) for p in value.split(":"))
            cursor = max(cursor, (a, s))
    if key and any(len(k) > 200 for k in key):
        raise BadSpec("a metric key is at most 200 characters")
    events = await gateway.follow_metrics(user, run_id, key or [], cursor)
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


@router.get(
    "/metrics/{key:path}/series",
    summary="a chart series: at most max_points buckets (min, max, last, count) that keep spikes",
)
async def get_series(
    run_id: str,
    key: str,
    user: CurrentUser,
    gateway: GatewayDep,
    max_points: Annotated[int, Query(ge=1, le=20000)] = 1000,
    start: Annotated[int | None, Query(ge=-(2**62), le=2**62, description="first step (inclusive)")] = None,
    end: Annotated[int | None, Query(ge=-(2**62), le=2**62, description="last step (inclusive)")] = None,
    include_superseded: Annotated[bool, Query(description="audit: also superseded points (slow path)")] = False,
) -> SeriesPublic:
    """Answered from the coarsest rollup (16, 256, 4096 or 65536 steps a bucket) that still gives
    at least ``max_points`` buckets in [start, end], merged down to ``max_points``; raw points
    when the range holds fewer. The edge buckets are exact for the range."""
    if not 0 < len(key) <= 200:
        raise BadSpec("a metric key is 1 to 200 characters")
    return await gateway.series(
        user, run_id, key, max_points=max_points, start=start, end=end, include_superseded=include_superseded
    )
