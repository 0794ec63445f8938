"""The HTTP client of choline's gateway (``/v1``): what the CLI and scripts use.

``CholineClient.from_settings()`` finds the gateway and the token the way every choline process
does (``CHOLINE_GATEWAY_URL`` / ``CHOLINE_API_TOKEN``, else ``$CHOLINE_HOME/endpoints.json`` and
``secrets/*.json``: ``choline up`` and ``choline login`` write them). Every method returns typed
models read leniently (fields a newer gateway adds are ignored) and raises a ``CholineError``
rebuilt from the gateway's error body ``{type, message, detail}``: ``NotFound`` for 404s,
``BadSpec`` for a bad GPU spec, ``Unauthorized`` for a missing or revoked token, and
``ControlPlaneDown`` when nothing answers at the gateway's address.

Synchronous (httpx), Python 3.10+, no server dependencies::

    with CholineClient.from_settings() as api:
        run = api.create_run(RunSpec(script="train.py", gpus="1xcpu"))
        for event in api.follow_logs(run.run_id):
            if event.kind == "line":
                print(event.line.text)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field

from choline_core import errors
from choline_core.advice import AdviceInfo
from choline_core.deploy import DeploymentInfo, ModelVersionInfo
from choline_core.events import ControlAction, RunSpec, RunState
from choline_core.pipeline import CheckpointInfo
from choline_core.rpc import AttemptInfo, RunInfo
from choline_core.settings import CholineSettings

__all__ = [
    "ArtifactFile",
    "ArtifactPage",
    "CholineClient",
    "CodeUpload",
    "ControlResult",
    "Delivery",
    "Finding",
    "FollowEvent",
    "LogLine",
    "LogPage",
    "Me",
    "MetricPoint",
    "MonitorInfo",
    "RunPage",
    "Series",
    "StreamToken",
    "TokenCreated",
    "TokenInfo",
    "Webhook",
    "WebhookCreated",
    "error_from_body",
]

WEBHOOK_EVENTS = (
    "run.started",
    "run.recovered",
    "run.paused",
    "run.succeeded",
    "run.failed",
    "run.cancelled",
    "finding.raised",
    "deployment.ready",
)

DOWN_HINT = "start it with 'choline up', or use a remote gateway: 'choline login URL TOKEN'"


class _Reader(BaseModel):
    """Lenient: a newer gateway's extra fields never break an older client."""

    model_config = ConfigDict(extra="ignore")


class Me(_Reader):
    user: str
    admin: bool
    token_id: str
    token_name: str


class TokenInfo(_Reader):
    id: str
    name: str
    user: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


class TokenCreated(TokenInfo):
    token: str


class RunPage(_Reader):
    runs: list[RunInfo]
    next_before: datetime | None = None


class ControlResult(_Reader):
    command_id: str
    run_id: str
    action: ControlAction
    params: dict[str, Any] = Field(default_factory=dict)


class LogLine(_Reader):
    id: int
    attempt: int
    seq: int
    ts: datetime
    stream: str
    text: str


class LogPage(_Reader):
    run_id: str
    lines: list[LogLine]
    more: bool = False
    next_attempt: int | None = None
    next_seq: int | None = None


class MetricPoint(_Reader):
    key: str
    step: int
    value: float | None
    raw: str | None = None
    attempt: int
    seq: int
    ts: datetime
    epoch: int | None = None
    superseded: bool = False


class ArtifactFile(_Reader):
    path: str  # relative to the run's artifacts folder
    size: int
    sha256: str | None = None
    attempt: int | None = None
    url: str | None = None  # presigned GET


class AttemptLog(_Reader):
    attempt: int
    size: int
    url: str | None = None


class ArtifactPage(_Reader):
    """A run's outputs: ``files`` (every artifact but the bundle), the model ``bundle`` and each
    attempt's full output log, with presigned download URLs."""

    run_id: str
    files: list[ArtifactFile] = Field(default_factory=list)
    bundle: ArtifactFile | None = None
    logs: list[AttemptLog] = Field(default_factory=list)


class CodeUpload(_Reader):
    digest: str
    kind: str
    key: str
    exists: bool
    url: str | None = None
    expires_s: int | None = None


class FollowEvent(_Reader):
    """One server-sent event of ``follow_logs``: ``line`` (with ``line``), ``state`` or ``end``
    (with ``state`` and ``reason``)."""

    kind: str
    line: LogLine | None = None
    state: RunState | None = None
    reason: str | None = None


class Finding(_Reader):
    id: str
    run_id: str
    attempt: int | None = None
    detector: str
    severity: str
    step: int | None = None
    ts: datetime | None = None
    message: str
    evidence: dict[str, Any] = Field(default_factory=dict)
    advice: dict[str, Any] | None = None  # the advisor's answer in short; ``advice()`` for all of it


class MonitorInfo(_Reader):
    """How the monitor watches a run: its policy (``notify`` | ``auto-pause``), the detectors whose
    critical findings pause it, and its detector overrides."""

    run_id: str
    policy: str
    explicit: bool = False
    pause_on: list[str] = Field(default_factory=list)
    overrides: dict[str, Any] = Field(default_factory=dict)


class Series(_Reader):
    """A chart series, columnar (entry i of each list is bucket i): see ``CholineClient.series``."""

    run_id: str
    key: str
    resolution: int
    source: str
    start: int | None = None
    end: int | None = None
    step: list[int] = Field(default_factory=list)
    last_step: list[int] = Field(default_factory=list)
    min: list[float | None] = Field(default_factory=list)
    max: list[float | None] = Field(default_factory=list)
    last: list[float | None] = Field(default_factory=list)
    count: list[int] = Field(default_factory=list)
    nonfinite: list[int] = Field(default_factory=list)


class StreamToken(_Reader):
    token: str
    run_id: str
    expires_at: datetime
    logs_url: str
    metrics_url: str


class Webhook(_Reader):
    id: str
    owner: str
    url: str  # redacted by the gateway: scheme://host/first-segment/...
    events: list[str]
    format: str
    description: str | None = None
    created_at: datetime
    pending: int = 0
    delivered: int = 0
    failed: int = 0


class WebhookCreated(Webhook):
    secret: str  # shown once


class DeliveryTry(_Reader):
    n: int
    at: datetime
    status: int | None = None
    error: str | None = None
    duration_ms: int = 0


class Delivery(_Reader):
    id: str
    event_id: str
    event_type: str
    state: str
    attempts: int
    next_at: datetime | None = None
    last_status: int | None = None
    last_error: str | None = None
    created_at: datetime
    finished_at: datetime | None = None
    tries: list[DeliveryTry] = Field(default_factory=list)


def _lenient(model: Any, data: Any) -> Any:
    """Read a core model (strict when written) leniently, as every reader should."""
    return model.model_validate(data, context={"lenient": True})


def error_from_body(status: int, body: Any, url: str = "") -> errors.CholineError:
    """The ``CholineError`` a gateway error answer stands for (its ``type`` picks the class)."""
    kind = body.get("type") if isinstance(body, dict) else None
    message = body.get("message") if isinstance(body, dict) else None
    detail = body.get("detail") if isinstance(body, dict) else None
    cls: type[errors.CholineError] | None = None
    if kind:
        for candidate in vars(errors).values():
            if isinstance(candidate, type) and issubclass(candidate, errors.CholineError) and candidate.kind == kind:
                cls = candidate
                break
    if cls is None:
        cls = {
            400: errors.UserError,
            401: errors.Unauthorized,
            403: errors.Forbidden,
            404: errors.NotFound,
            409: errors.Conflict,
            422: errors.UserError,
            503: errors.Retryable,
        }.get(status, errors.InfraError if status >= 500 else errors.UserError)
    if not message:
        message = f"the gateway answered {status} for {url}" if url else f"the gateway answered {status}"
    return cls(str(message), detail=detail)


class CholineClient:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        headers = {"User-Agent": "choline-cli"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    @classmethod
    def from_settings(cls, settings: CholineSettings | None = None, **kwargs: Any) -> CholineClient:
        s = settings or CholineSettings()
        return cls(s.gateway_url, s.secret("api_token"), **kwargs)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CholineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing
    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        if not self._token:
            raise errors.Unauthorized(
                f"no API token for the gateway at {self.base_url}",
                hint="'choline up' writes one for the local control plane; 'choline login URL TOKEN' for another",
            )
        try:
            resp = self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise errors.ControlPlaneDown(f"control plane not reachable at {self.base_url}", hint=DOWN_HINT) from exc
        except httpx.TimeoutException as exc:
            raise errors.ControlPlaneDown(
                f"the gateway at {self.base_url} did not answer in time ({type(exc).__name__})",
                hint="see 'choline status'",
            ) from exc
        except httpx.TransportError as exc:
            raise errors.ControlPlaneDown(f"lost the gateway at {self.base_url}: {exc}", hint=DOWN_HINT) from exc
        if resp.status_code >= 400:
            raise self._error(resp)
        return resp

    @staticmethod
    def _error(resp: httpx.Response) -> errors.CholineError:
        try:
            body = resp.json()
        except ValueError:
            body = None
        return error_from_body(resp.status_code, body, str(resp.request.url.path))

    def _get(self, path: str, **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v is not None}
        return self._request("GET", path, params=clean).json()

    # ------------------------------------------------------------------ who
    def me(self) -> Me:
        return Me.model_validate(self._get("/v1/me"))

    # ------------------------------------------------------------------ runs
    def create_run(self, spec: RunSpec | dict[str, Any], *, idempotency_key: str | None = None) -> RunInfo:
        """Queue a run (202: state ``queued``). A retry with the same ``idempotency_key`` returns the
        run the first call queued instead of queueing another."""
        body = spec.model_dump(mode="json", exclude_none=True) if isinstance(spec, RunSpec) else spec
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return _lenient(RunInfo, self._request("POST", "/v1/runs", json=body, headers=headers).json())

    def list_runs(
        self,
        *,
        states: list[str] | None = None,
        name: str | None = None,
        limit: int = 50,
        before: datetime | None = None,
    ) -> RunPage:
        params: dict[str, Any] = {"limit": limit, "name": name}
        if states:
            params["state"] = list(states)
        if before is not None:
            params["before"] = before.isoformat()
        data = self._get("/v1/runs", **params)
        return RunPage(runs=[_lenient(RunInfo, r) for r in data.get("runs", [])], next_before=data.get("next_before"))

    def get_run(self, run_id: str) -> RunInfo:
        return _lenient(RunInfo, self._get(f"/v1/runs/{run_id}"))

    def control(self, run_id: str, action: ControlAction | str, params: dict[str, Any] | None = None) -> ControlResult:
        body = {"action": ControlAction(action).value, "params": params or {}}
        return ControlResult.model_validate(self._request("POST", f"/v1/runs/{run_id}/control", json=body).json())

    def pause(self, run_id: str) -> ControlResult:
        return self.control(run_id, ControlAction.pause)

    def resume(self, run_id: str) -> ControlResult:
        return self.control(run_id, ControlAction.resume)

    def stop(self, run_id: str) -> ControlResult:
        return self.control(run_id, ControlAction.stop)

    def cancel(self, run_id: str) -> ControlResult:
        return self.control(run_id, ControlAction.cancel)

    def set_params(self, run_id: str, params: dict[str, Any]) -> ControlResult:
        return self.control(run_id, ControlAction.set, params)

    def wait(self, run_id: str, *, timeout: float | None = None, poll: float = 1.0) -> RunInfo:
        """Poll until the run reaches a terminal state; ``TimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = min(0.2, poll)
        while True:
            run = self.get_run(run_id)
            if run.state.terminal:
                return run
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"run {run_id} is still {run.state.value} after {timeout:g}s")
            time.sleep(delay)
            delay = min(delay * 2, poll)

    # ------------------------------------------------------------------ logs and metrics
    def logs(
        self,
        run_id: str,
        *,
        attempt: int | None = None,
        after_seq: int | None = None,
        after_attempt: int | None = None,
        limit: int = 1000,
    ) -> LogPage:
        data = self._get(
            f"/v1/runs/{run_id}/logs", attempt=attempt, after_seq=after_seq, after_attempt=after_attempt, limit=limit
        )
        return LogPage.model_validate(data)

    def iter_logs(self, run_id: str, *, attempt: int | None = None, page: int = 1000) -> Iterator[LogLine]:
        """Every stored line of the run (or one attempt), in (attempt, seq) order, page by page."""
        after_attempt: int | None = None
        after_seq: int | None = None
        while True:
            got = self.logs(run_id, attempt=attempt, after_seq=after_seq, after_attempt=after_attempt, limit=page)
            yield from got.lines
            if not got.more or not got.lines:
                return
            after_attempt, after_seq = got.next_attempt, got.next_seq

    def follow_logs(self, run_id: str, *, after_id: int = 0, read_timeout: float = 60.0) -> Iterator[FollowEvent]:
        """Stream the run's output live (server-sent events) until the run ends: ``line`` events as
        lines are stored, ``state`` when the run moves, a last ``end``. Reconnects after a dropped
        connection from the last line seen, so nothing is printed twice."""
        last_id = after_id
        retries = 0
        while True:
            try:
                for event in self._follow_once(run_id, last_id, read_timeout):
                    retries = 0
                    if event.line is not None:
                        last_id = event.line.id
                    yield event
                    if event.kind == "end":
                        return
                return  # the server closed the stream without an end (it is stopping): done
            except errors.ControlPlaneDown:
                retries += 1
                if retries > 5:
                    raise
                time.sleep(min(0.5 * 2**retries, 5.0))

    def _follow_once(self, run_id: str, after_id: int, read_timeout: float) -> Iterator[FollowEvent]:
        if not self._token:
            self._request("GET", "/v1/me")  # raises the no-token error
        params: dict[str, str | int] = {"follow": "true", "after_id": after_id}
        timeout = httpx.Timeout(10.0, read=read_timeout)
        try:
            with self._http.stream("GET", f"/v1/runs/{run_id}/logs", params=params, timeout=timeout) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise self._error(resp)
                yield from _parse_sse(resp.iter_lines())
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise errors.ControlPlaneDown(f"control plane not reachable at {self.base_url}", hint=DOWN_HINT) from exc
        except (httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.ReadError) as exc:
            raise errors.ControlPlaneDown(f"lost the log stream from {self.base_url}: {type(exc).__name__}") from exc

    def metrics(
        self,
        run_id: str,
        keys: list[str] | None = None,
        *,
        attempt: int | None = None,
        include_superseded: bool = False,
        limit: int = 10000,
    ) -> list[MetricPoint]:
        """Every point of the run's history (all pages), ordered by step."""
        points: list[MetricPoint] = []
        after_step: int | None = None
        while True:
            params: dict[str, Any] = {"limit": limit, "attempt": attempt, "after_step": after_step}
            if keys:
                params["key"] = list(keys)
            if include_superseded:
                params["include_superseded"] = "true"
            data = self._get(f"/v1/runs/{run_id}/metrics", **params)
            points += [MetricPoint.model_validate(p) for p in data.get("points", [])]
            if not data.get("more") or data.get("next_after_step") is None:
                return points
            after_step = int(data["next_after_step"])

    def metric_keys(self, run_id: str) -> list[str]:
        return list(self._get(f"/v1/runs/{run_id}/metrics/keys").get("keys", []))

    # ------------------------------------------------------------------ checkpoints, artifacts, code
    def checkpoints(self, run_id: str, *, include_deleted: bool = False) -> list[CheckpointInfo]:
        """The run's checkpoints, newest step first (``include_deleted``: also those retention removed)."""
        data = self._get(f"/v1/runs/{run_id}/checkpoints", include_deleted="true" if include_deleted else None)
        return [_lenient(CheckpointInfo, c) for c in data.get("checkpoints", [])]

    def artifacts(self, run_id: str) -> ArtifactPage:
        return ArtifactPage.model_validate(self._get(f"/v1/runs/{run_id}/artifacts"))

    def code_upload(self, digest: str, kind: str = "code") -> CodeUpload:
        """Whether a content-addressed code bundle or env spec is stored; if not, a presigned PUT URL."""
        return CodeUpload.model_validate(
            self._request("POST", "/v1/code", json={"digest": digest, "kind": kind}).json()
        )

    def download(self, url: str, dest: Path, *, chunk: int = 1 << 20) -> int:
        """Stream a presigned GET ``url`` to ``dest`` (written beside, then renamed). Returns bytes."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        size = 0
        try:
            with httpx.stream("GET", url, timeout=httpx.Timeout(30.0, read=300.0)) as resp:
                if resp.status_code >= 400:
                    raise errors.StorageError(f"download of {dest.name} failed: HTTP {resp.status_code}")
                with open(tmp, "wb") as fh:
                    for part in resp.iter_bytes(chunk):
                        fh.write(part)
                        size += len(part)
            tmp.replace(dest)
        except httpx.TransportError as exc:
            raise errors.StorageError(f"download of {dest.name} failed: {exc}") from exc
        finally:
            if tmp.exists():
                tmp.unlink()
        return size

    # ------------------------------------------------------------------ offers and boxes
    def offers(
        self, gpus: str, *, provider: str = "local", max_price: float | None = None, limit: int = 20
    ) -> list[dict[str, Any]]:
        data = self._get("/v1/offers", gpus=gpus, provider=provider, max_price=max_price, limit=limit)
        return list(data.get("offers", []))

    def boxes(self, *, include_destroyed: bool = False) -> list[dict[str, Any]]:
        data = self._get("/v1/boxes", include_destroyed="true" if include_destroyed else None)
        return list(data.get("boxes", []))

    # ------------------------------------------------------------------ attempts, findings, charts
    def attempts(self, run_id: str) -> list[AttemptInfo]:
        data = self._get(f"/v1/runs/{run_id}/attempts")
        return [_lenient(AttemptInfo, a) for a in data.get("attempts", [])]

    def findings(self, run_id: str | None = None, *, limit: int = 100) -> list[Finding]:
        """What the monitor found in a run (or in all your runs), newest first."""
        path = f"/v1/runs/{run_id}/findings" if run_id else "/v1/findings"
        return [Finding.model_validate(f) for f in self._get(path, limit=limit).get("findings", [])]

    # ------------------------------------------------------------------ the advisor and the monitor's policy
    def advise(self, run_id: str, question: str | None = None, *, finding_id: str | None = None) -> AdviceInfo:
        """Ask the advisor about a run; the advice comes back ``pending`` (``wait_advice``), or
        ``rate_limited`` with the reason in ``error``."""
        body = {"question": question, "finding_id": finding_id}
        data = self._request("POST", f"/v1/runs/{run_id}/advise", json=body).json()
        return _lenient(AdviceInfo, data)

    def advice(self, run_id: str, *, limit: int = 20, include_context: bool = False) -> list[AdviceInfo]:
        """The advisor's answers about a run, newest first."""
        data = self._get(f"/v1/runs/{run_id}/advice", limit=limit, include_context=str(include_context).lower())
        return [_lenient(AdviceInfo, a) for a in data.get("advice", [])]

    def get_advice(self, run_id: str, advice_id: str, *, include_context: bool = False) -> AdviceInfo:
        data = self._get(f"/v1/runs/{run_id}/advice/{advice_id}", include_context=str(include_context).lower())
        return _lenient(AdviceInfo, data)

    def wait_advice(
        self, run_id: str, advice_id: str, *, timeout: float = 180.0, poll: float = 0.5, include_context: bool = False
    ) -> AdviceInfo:
        """Poll until the advice is no longer pending; ``TimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.get_advice(run_id, advice_id, include_context=include_context)
            if found.done:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the advisor has not answered about {run_id} after {timeout:g}s")
            time.sleep(poll)

    def monitor(self, run_id: str) -> MonitorInfo:
        return MonitorInfo.model_validate(self._get(f"/v1/runs/{run_id}/monitor"))

    def set_monitor(self, run_id: str, *, policy: str | None = None, settings: list[str] | None = None) -> MonitorInfo:
        """Set a run's monitor policy (``notify`` | ``auto-pause``) and/or detector settings
        (``["divergence.k=6"]``, merged into the run's own)."""
        body: dict[str, Any] = {"policy": policy, "set": list(settings or [])}
        return MonitorInfo.model_validate(self._request("PUT", f"/v1/runs/{run_id}/monitor", json=body).json())

    def series(
        self,
        run_id: str,
        key: str,
        *,
        max_points: int = 1000,
        start: int | None = None,
        end: int | None = None,
        include_superseded: bool = False,
    ) -> Series:
        """At most ``max_points`` buckets of a metric (min, max, last, count each): spikes kept."""
        params: dict[str, Any] = {"max_points": max_points, "start": start, "end": end}
        if include_superseded:
            params["include_superseded"] = "true"
        return Series.model_validate(self._get(f"/v1/runs/{run_id}/metrics/{quote(key, safe='/')}/series", **params))

    def stream_token(self, run_id: str) -> StreamToken:
        """A short-lived token for a browser's EventSource on this run's follow endpoints."""
        return StreamToken.model_validate(self._request("POST", f"/v1/runs/{run_id}/stream-token").json())

    # ------------------------------------------------------------------ webhooks
    def create_webhook(
        self, url: str, events: list[str], *, format: str = "choline", description: str | None = None
    ) -> WebhookCreated:
        body: dict[str, Any] = {"url": url, "events": list(events), "format": format}
        if description:
            body["description"] = description
        return WebhookCreated.model_validate(self._request("POST", "/v1/webhooks", json=body).json())

    def list_webhooks(self, *, all_users: bool = False) -> list[Webhook]:
        return [Webhook.model_validate(w) for w in self._get("/v1/webhooks", all="true" if all_users else None)]

    def get_webhook(self, webhook_id: str) -> Webhook:
        return Webhook.model_validate(self._get(f"/v1/webhooks/{webhook_id}"))

    def delete_webhook(self, webhook_id: str) -> None:
        self._request("DELETE", f"/v1/webhooks/{webhook_id}")

    def test_webhook(self, webhook_id: str) -> str:
        """Queue a ``ping`` delivery; returns its event id."""
        return str(self._request("POST", f"/v1/webhooks/{webhook_id}/test").json()["event_id"])

    def webhook_deliveries(self, webhook_id: str, *, limit: int = 50) -> list[Delivery]:
        data = self._get(f"/v1/webhooks/{webhook_id}/deliveries", limit=limit)
        return [Delivery.model_validate(d) for d in data.get("deliveries", [])]

    # ------------------------------------------------------------------ tokens
    def create_token(self, name: str, *, user: str | None = None, admin: bool = False) -> TokenCreated:
        body: dict[str, Any] = {"name": name}
        if user:
            body["user"] = user
        if admin:
            body["admin"] = True
        return TokenCreated.model_validate(self._request("POST", "/v1/tokens", json=body).json())

    def list_tokens(self, *, all_users: bool = False) -> list[TokenInfo]:
        data = self._get("/v1/tokens", all="true" if all_users else None)
        return [TokenInfo.model_validate(t) for t in data]

    def revoke_token(self, token_id: str) -> None:
        self._request("DELETE", f"/v1/tokens/{token_id}")

    # ------------------------------------------------------------------ models (issue 17)
    def list_models(self, *, cards: bool = False) -> list[ModelVersionInfo]:
        """Every version of every model you own, newest version first within a name."""
        data = self._get("/v1/models", cards="true" if cards else None)
        return [_lenient(ModelVersionInfo, m) for m in data.get("models", [])]

    def get_model(self, name: str, version: int | None = None, *, download: bool = False) -> ModelVersionInfo:
        """One version (default: the newest) with its card; ``download``: with a presigned GET ``url``."""
        data = self._get(f"/v1/models/{quote(name, safe='')}", version=version, download="true" if download else None)
        return _lenient(ModelVersionInfo, data)  # type: ignore[no-any-return]

    def push_model(self, path: str | Path) -> ModelVersionInfo:
        """Register a bundle made elsewhere: a ``.choline-bundle.tar.gz`` (or a bundle folder, packed first)."""
        import hashlib

        p = Path(path)
        if p.is_dir():
            from choline.bundle import pack

            p = pack(p)
        if not p.is_file():
            raise errors.BadSpec(f"{path} is not a bundle tarball or folder")
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        sha, size = h.hexdigest(), p.stat().st_size
        up = self._request("POST", "/v1/models/uploads", json={"sha256": sha, "size": size}).json()
        if not up.get("exists"):
            try:
                with open(p, "rb") as fh:
                    r = httpx.put(up["url"], content=fh, headers={"Content-Length": str(size)}, timeout=300)
            except httpx.TransportError as exc:
                raise errors.StorageError(f"uploading {p.name} failed: {exc}") from exc
            if r.status_code >= 400:
                raise errors.StorageError(f"uploading {p.name} failed: HTTP {r.status_code}")
        data = self._request("POST", "/v1/models", json={"key": up["key"], "sha256": sha}).json()
        return _lenient(ModelVersionInfo, data)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ deployments (issue 17)
    def deploy(
        self, model: str, version: int | None = None, *, name: str | None = None, **config: Any
    ) -> DeploymentInfo:
        """Start serving a model version (state ``deploying``; ``wait_deployment`` until ``ready``).
        ``config``: replicas, max_batch, max_wait_ms, timeout_s, gpus, provider."""
        body: dict[str, Any] = {"model": model, "version": version, "name": name, "config": config}
        return _lenient(DeploymentInfo, self._request("POST", "/v1/deployments", json=body).json())  # type: ignore[no-any-return]

    def list_deployments(self) -> list[DeploymentInfo]:
        return [_lenient(DeploymentInfo, d) for d in self._get("/v1/deployments").get("deployments", [])]

    def get_deployment(self, name: str) -> DeploymentInfo:
        return _lenient(DeploymentInfo, self._get(f"/v1/deployments/{quote(name, safe='')}"))  # type: ignore[no-any-return]

    def wait_deployment(self, name: str, *, timeout: float = 300.0, poll: float = 0.5) -> DeploymentInfo:
        """Until the deployment is ``ready`` (every replica answers) or ``failed`` (raised)."""
        deadline = time.monotonic() + timeout
        while True:
            d = self.get_deployment(name)
            if d.state == "ready" and d.replicas and all(r.state == "ready" for r in d.replicas):
                return d
            if d.state == "failed":
                raise errors.CholineError(f"deployment {name} failed: {d.reason}", hint="see 'choline deployments ls'")
            if time.monotonic() > deadline:
                raise errors.CholineError(f"deployment {name} is not ready after {timeout:g} s ({d.state})")
            time.sleep(poll)

    def undeploy(self, name: str) -> DeploymentInfo:
        resp = self._request("DELETE", f"/v1/deployments/{quote(name, safe='')}", timeout=120)
        return _lenient(DeploymentInfo, resp.json())  # type: ignore[no-any-return]

    def rollback(self, name: str) -> DeploymentInfo:
        resp = self._request("POST", f"/v1/deployments/{quote(name, safe='')}/rollback")
        return _lenient(DeploymentInfo, resp.json())  # type: ignore[no-any-return]

    def predict(self, name: str, body: dict[str, Any] | list[Any] | bytes, *, batch: bool = False) -> Any:
        """One prediction (``body``: the model's inputs) or, with ``batch``, ``{"instances": [...]}``."""
        path = f"/v1/deployments/{quote(name, safe='')}/predict" + ("/batch" if batch else "")
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self._request("POST", path, content=content, headers={"Content-Type": "application/json"}).json()


def _parse_sse(lines: Iterator[str]) -> Iterator[FollowEvent]:
    """Server-sent events (``event:``/``data:`` blocks) into ``FollowEvent``s."""
    event, data = "message", list[str]()
    for raw in lines:
        line = raw.rstrip("\r")
        if not line:
            if data:
                payload = json.loads("\n".join(data))
                if event == "line":
                    yield FollowEvent(kind="line", line=LogLine.model_validate(payload))
                elif event in ("state", "end"):
                    yield FollowEvent(kind=event, state=payload.get("state"), reason=payload.get("reason"))
            event, data = "message", list[str]()
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
