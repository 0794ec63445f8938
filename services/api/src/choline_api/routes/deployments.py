"""``/v1/deployments``: deploy a model version, list, undeploy, roll back (owned by the deploy service), and
the predict proxy: ``POST /v1/deployments/{name}/predict`` (and ``/predict/batch``, ``GET .../metadata``)
forwards the body to one of the deployment's ready replicas, so a client needs one URL and one token.

The proxy caches each deployment's route (its ready replicas' URLs) for ``ROUTE_TTL_S``; a replica that
refuses the connection (drained after a rollout, or restarted) makes it ask the deploy service again and try
once more: a request is never lost to a switch. Bodies pass through untouched; the serving process checks
them against the card and answers 4xx itself.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Path, Request, Response, status
from pydantic import BaseModel, ConfigDict
from pydantic import Field as PField

from choline_core import deploy as c
from choline_core.errors import InfraError, NotFound, Retryable

from ..deps import CurrentUser, GatewayDep
from ..gateway import Gateway
from ..store import Principal

router = APIRouter(prefix="/deployments", tags=["deployments"])

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$"
DeploymentName = Annotated[str, Path(pattern=NAME, description="the deployment's name")]
ROUTE_TTL_S = 1.0
PROXY_TIMEOUT_S = 120.0


class DeploymentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = PField(pattern=NAME, description="the model's name")
    version: int | None = PField(default=None, ge=1, description="default: the newest")
    name: str | None = PField(default=None, pattern=NAME, description="the deployment's name (default: the model's)")
    config: c.DeployConfig = PField(default_factory=c.DeployConfig)


class DeploymentPage(BaseModel):
    deployments: list[c.DeploymentInfo]


def _reader(user: Principal) -> str | None:
    return None if user.admin else user.user


@router.post("", status_code=status.HTTP_202_ACCEPTED, summary="deploy a model version (state deploying, then ready)")
async def create_deployment(body: DeploymentCreate, user: CurrentUser, gateway: GatewayDep) -> c.DeploymentInfo:
    req = c.DeployRequest(model=body.model, version=body.version, owner=user.user, name=body.name, config=body.config)
    return await gateway.call(c.DEPLOY, c.DEPLOY_CREATE, req, c.DeploymentInfo)


@router.get("", summary="your deployments with their replicas")
async def list_deployments(user: CurrentUser, gateway: GatewayDep) -> DeploymentPage:
    found = await gateway.call(c.DEPLOY, c.DEPLOYMENTS, c.DeploymentsQuery(owner=_reader(user)), c.DeploymentList)
    return DeploymentPage(deployments=found.deployments)


@router.get("/{name}", summary="one deployment")
async def get_deployment(name: DeploymentName, user: CurrentUser, gateway: GatewayDep) -> c.DeploymentInfo:
    q = c.DeploymentsQuery(owner=_reader(user), name=name)
    found = await gateway.call(c.DEPLOY, c.DEPLOYMENTS, q, c.DeploymentList)
    if not found.deployments:
        raise NotFound(f"no deployment {name!r}", hint="'choline deployments ls' lists yours")
    return found.deployments[0]


@router.delete("/{name}", summary="undeploy: stop every replica and release what it holds")
async def delete_deployment(name: DeploymentName, user: CurrentUser, gateway: GatewayDep) -> c.DeploymentInfo:
    req = c.UndeployRequest(name=name, owner=_reader(user))
    return await _call_long(gateway, c.UNDEPLOY, req, c.DeploymentInfo)


@router.post("/{name}/rollback", status_code=status.HTTP_202_ACCEPTED, summary="serve the previous version again")
async def rollback_deployment(name: DeploymentName, user: CurrentUser, gateway: GatewayDep) -> c.DeploymentInfo:
    return await gateway.call(c.DEPLOY, c.ROLLBACK, c.RollbackRequest(name=name, owner=_reader(user)), c.DeploymentInfo)


async def _call_long(gateway: Gateway, method: str, request: Any, reply: Any, timeout: float = 90.0) -> Any:
    """Undeploy waits for the replicas to drain: longer than the gateway's usual RPC timeout."""
    from choline_core.errors import BusError
    from choline_core.rpc import raise_for_error

    try:
        env = await gateway.bus.request(gateway.subjects.rpc(c.DEPLOY, method), request, timeout=timeout)
    except BusError as exc:
        raise BusError(f"the deploy service is not answering ({method}): {exc.message}") from exc
    raise_for_error(env)
    return env.event(reply)


# ===================================================================================== the proxy
class Proxy:
    """Routes cached per (owner, name), replicas taken in turn, one shared HTTP client."""

    def __init__(self) -> None:
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(PROXY_TIMEOUT_S, connect=3.0), trust_env=False)
        self.routes: dict[tuple[str | None, str], tuple[float, c.Route]] = {}
        self.turn = itertools.count()

    async def route(self, gateway: Gateway, owner: str | None, name: str, *, fresh: bool = False) -> c.Route:
        key = (owner, name)
        cached = self.routes.get(key)
        if cached and not fresh and time.monotonic() - cached[0] < ROUTE_TTL_S:
            return cached[1]
        route = await gateway.call(c.DEPLOY, c.ROUTE, c.RouteQuery(name=name, owner=owner), c.Route)
        self.routes[key] = (time.monotonic(), route)
        return route

    async def forward(
        self, gateway: Gateway, owner: str | None, name: str, method: str, path: str, body: bytes, ctype: str | None
    ) -> Response:
        headers = {"content-type": ctype} if ctype else {}
        last: Exception | None = None
        for attempt in range(4):
            route = await self.route(gateway, owner, name, fresh=attempt > 0)
            if not route.urls:
                raise Retryable(f"deployment {name!r} has no ready replica")
            i = next(self.turn) % len(route.urls)
            url = route.urls[i]
            token = route.tokens[i] if i < len(route.tokens) else ""
            sent = {**headers, "authorization": f"Bearer {token}"} if token else headers
            try:
                r = await self.http.request(method, f"{url}{path}", content=body, headers=sent)
            except (httpx.ConnectError, httpx.RemoteProtocolError) as exc:  # not received: safe to send again
                last = exc
                self.routes.pop((owner, name), None)
                await asyncio.sleep(0.05 * attempt)
                continue
            except httpx.TimeoutException as exc:
                raise InfraError(f"deployment {name!r} did not answer in {PROXY_TIMEOUT_S:g} s") from exc
            out_headers = {k: v for k, v in r.headers.items() if k.lower() in ("retry-after",)}
            out_headers["x-choline-model-version"] = str(route.version)
            return Response(r.content, status_code=r.status_code, media_type="application/json", headers=out_headers)
        raise Retryable(f"deployment {name!r}: no replica took the request ({last})", hint="try again in a moment")


def _proxy(request: Request) -> Proxy:
    proxy: Proxy | None = getattr(request.app.state, "deploy_proxy", None)
    if proxy is None:
        proxy = request.app.state.deploy_proxy = Proxy()
    return proxy


PREDICT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"type": "object", "description": "see GET .../openapi.json"}}},
    }
}


@router.post("/{name}/predict", summary="one prediction from the deployment (body: the model's inputs)",
             openapi_extra=PREDICT_BODY)  # fmt: skip
async def predict(name: DeploymentName, request: Request, user: CurrentUser, gateway: GatewayDep) -> Response:
    body = await request.body()
    ctype = request.headers.get("content-type")
    return await _proxy(request).forward(gateway, _reader(user), name, "POST", "/predict", body, ctype)


@router.post("/{name}/predict/batch", summary="several predictions: {'instances': [...]}", openapi_extra=PREDICT_BODY)
async def predict_batch(name: DeploymentName, request: Request, user: CurrentUser, gateway: GatewayDep) -> Response:
    body = await request.body()
    ctype = request.headers.get("content-type")
    return await _proxy(request).forward(gateway, _reader(user), name, "POST", "/predict/batch", body, ctype)


@router.get("/{name}/metadata", summary="the served model's card and serving settings")
async def metadata(name: DeploymentName, request: Request, user: CurrentUser, gateway: GatewayDep) -> Response:
    return await _proxy(request).forward(gateway, _reader(user), name, "GET", "/metadata", b"", None)


@router.get("/{name}/openapi.json", summary="the served model's own OpenAPI document (its request schema)")
async def model_openapi(name: DeploymentName, request: Request, user: CurrentUser, gateway: GatewayDep) -> Response:
    return await _proxy(request).forward(gateway, _reader(user), name, "GET", "/openapi.json", b"", None)
