"""``/v1/offers`` (what a spec would rent, and at what price), ``/v1/boxes``, ``/v1/code``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from ..deps import CurrentUser, GatewayDep
from ..models import BoxPage, CodeCreate, CodePublic, OfferPage

router = APIRouter(tags=["boxes and offers"])


@router.get("/offers", summary="offers matching a GPU spec, cheapest first")
async def list_offers(
    user: CurrentUser,
    gateway: GatewayDep,
    gpus: Annotated[str, Query(min_length=1, max_length=64, description="a GPU spec: 4x3090, 1xA100-80GB, cpu")],
    provider: Annotated[str, Query(max_length=32)] = "local",
    max_price: Annotated[float | None, Query(description="$/h")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
) -> OfferPage:
    found = await gateway.offers(gpus, provider, max_price, limit)
    return OfferPage(offers=found.offers)


@router.get("/boxes", summary="your boxes (rented machines)")
async def list_boxes(user: CurrentUser, gateway: GatewayDep, include_destroyed: bool = False) -> BoxPage:
    found = await gateway.boxes(user, include_destroyed)
    return BoxPage(boxes=found.boxes)


@router.post("/code", summary="where to upload a code bundle or env spec (or that it is already stored)")
async def code_upload(body: CodeCreate, user: CurrentUser, gateway: GatewayDep) -> CodePublic:
    return await gateway.code_upload(body.digest, body.kind)
