"""``/v1/runs/{id}/advice``, ``/advise`` and ``/monitor``: the monitor's advisor and a run's monitor policy.

Thin: each call checks that the caller may see the run, then asks the monitor (which owns advice,
findings and policies) over NATS. Contracts: ``choline_core.advice``.

- ``POST /v1/runs/{id}/advise`` ``{question?, finding_id?}`` -> 202, the advice (``pending``; poll
  ``GET /v1/runs/{id}/advice/{advice_id}`` until its ``status`` is no longer pending), or
  ``rate_limited`` with the reason;
- ``GET /v1/runs/{id}/advice`` -> the run's advice, newest first (``include_context=true``: the
  condensed context each was asked with);
- ``GET /v1/runs/{id}/monitor`` -> the run's policy (``notify`` | ``auto-pause``), the detectors
  whose critical findings pause it, and its detector overrides;
- ``PUT /v1/runs/{id}/monitor`` ``{policy?, set?: ["divergence.k=6"]}`` -> the same, after the change
  (``set`` merges into the run's overrides; a bad name or value is a 400 that changes nothing).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, status
from pydantic import BaseModel, ConfigDict
from pydantic import Field as PField

from choline_core import advice as contracts
from choline_core import rpc
from choline_core.advice import AdviceInfo, PolicyInfo
from choline_core.errors import NotFound

from ..deps import CurrentUser, GatewayDep

router = APIRouter(prefix="/runs", tags=["advice"])


class AdviseCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str | None = PField(None, max_length=2000, description="e.g. 'what should I try next?'")
    finding_id: str | None = PField(None, max_length=32, description="ask about this finding of the run")


class AdvicePage(BaseModel):
    run_id: str
    advice: list[AdviceInfo] = PField(description="newest first")


class MonitorUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    policy: Literal["notify", "auto-pause"] | None = None
    set: list[str] = PField(default_factory=list, description="detector settings: divergence.k=6 stall.enabled=false")


class MonitorPublic(BaseModel):
    run_id: str
    policy: str
    explicit: bool
    pause_on: list[str]
    overrides: dict[str, Any]


@router.post(
    "/{run_id}/advise", status_code=status.HTTP_202_ACCEPTED, summary="ask the advisor about the run (answered later)"
)
async def advise(run_id: str, body: AdviseCreate, user: CurrentUser, gateway: GatewayDep) -> AdviceInfo:
    """Ask what went wrong and what to try next, for a running or a finished run. The answer comes
    from the language model the monitor is configured with (``CHOLINE_LLM_*``), or, without one, is
    the monitor's own findings. Rate limited per run."""
    await gateway.ensure_access(user, run_id)
    request = contracts.AdviseRequest(run_id=run_id, question=body.question, finding_id=body.finding_id, by=user.user)
    found = await gateway.call(contracts.MONITOR, contracts.ADVISE, request, contracts.AdviceList)
    return found.advice[0]


@router.get("/{run_id}/advice", summary="the advisor's answers about the run, newest first")
async def list_advice(
    run_id: str,
    user: CurrentUser,
    gateway: GatewayDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    include_context: bool = False,
) -> AdvicePage:
    await gateway.ensure_access(user, run_id)
    query = contracts.AdviceQuery(run_id=run_id, limit=limit, include_context=include_context)
    found = await gateway.call(contracts.MONITOR, contracts.ADVICE, query, contracts.AdviceList)
    return AdvicePage(run_id=run_id, advice=found.advice)


@router.get("/{run_id}/advice/{advice_id}", summary="one answer of the advisor")
async def get_advice(
    run_id: str, advice_id: str, user: CurrentUser, gateway: GatewayDep, include_context: bool = False
) -> AdviceInfo:
    await gateway.ensure_access(user, run_id)
    query = contracts.AdviceQuery(run_id=run_id, advice_id=advice_id, limit=1, include_context=include_context)
    found = await gateway.call(contracts.MONITOR, contracts.ADVICE, query, contracts.AdviceList)
    if not found.advice:
        raise NotFound(f"run {run_id} has no advice {advice_id}", hint=f"'choline advise {run_id}'")
    return found.advice[0]


async def _policy(gateway: Any, run_id: str, policy: str | None = None) -> MonitorPublic:
    request = contracts.PolicyRequest(run_id=run_id, policy=policy)  # type: ignore[arg-type]
    info: PolicyInfo = await gateway.call(contracts.MONITOR, contracts.POLICY, request, PolicyInfo)
    return MonitorPublic(
        run_id=run_id, policy=info.policy, explicit=info.explicit, pause_on=info.pause_on, overrides=info.overrides
    )


@router.get("/{run_id}/monitor", summary="how the monitor watches the run: its policy and detector settings")
async def get_monitor(run_id: str, user: CurrentUser, gateway: GatewayDep) -> MonitorPublic:
    await gateway.ensure_access(user, run_id)
    return await _policy(gateway, run_id)


@router.put("/{run_id}/monitor", summary="set the run's policy (notify | auto-pause) and detector settings")
async def set_monitor(run_id: str, body: MonitorUpdate, user: CurrentUser, gateway: GatewayDep) -> MonitorPublic:
    """``auto-pause``: a critical NaN or divergence finding pauses the run (its box is released);
    ``notify`` (the default): findings only. ``set`` changes detector thresholds for this run."""
    await gateway.ensure_access(user, run_id)
    if body.set:
        from choline_core.events import Envelope

        env = Envelope(type="monitor.configure", data={"run_id": run_id, "set": body.set, "merge": True})
        reply = await gateway.bus.request(
            gateway.subjects.rpc(contracts.MONITOR, "configure"), env, timeout=gateway.settings.api_rpc_timeout
        )
        rpc.raise_for_error(reply)
    return await _policy(gateway, run_id, body.policy)
