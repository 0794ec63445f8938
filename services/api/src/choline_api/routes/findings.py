"""``/v1/findings``: what the monitor found, across the caller's runs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from ..deps import CurrentUser, GatewayDep
from ..models import FindingPage

router = APIRouter(tags=["findings"])


@router.get("/findings", summary="findings of all your runs, newest first")
async def list_findings(
    user: CurrentUser, gateway: GatewayDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> FindingPage:
    return await gateway.findings(user, None, limit)
