"""``/v1/webhooks``: your endpoints, the events they get, and each delivery's tries."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from ..deps import CurrentUser, GatewayDep
from ..models import DeliveryPage, WebhookCreate, WebhookCreated, WebhookPublic
from ..webhooks import check_destination

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


@router.post("", status_code=status.HTTP_201_CREATED, summary="add a webhook (its signing secret is shown once)")
async def create_webhook(body: WebhookCreate, user: CurrentUser, gateway: GatewayDep) -> WebhookCreated:
    """Every delivery is a POST of JSON signed with the secret: ``X-Choline-Timestamp`` and
    ``X-Choline-Signature: v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>``. ``format``
    ``slack`` / ``discord`` sends ``{"text": ...}`` / ``{"content": ...}`` instead (still signed)."""
    await gateway.db(check_destination, body.url, allow_private=gateway.settings.api_webhook_allow_private)
    row, secret = await gateway.db(
        gateway.webhooks.create, user.user, body.url, [e.value for e in body.events], body.format, body.description
    )
    public = (await gateway.db(gateway.webhooks.public, [row]))[0]
    return WebhookCreated(**public.model_dump(), secret=secret)


@router.get("", summary="your webhooks (never their secrets)")
async def list_webhooks(
    user: CurrentUser,
    gateway: GatewayDep,
    all: Annotated[bool, Query(description="admin: every user's webhooks")] = False,
) -> list[WebhookPublic]:
    owner = None if (all and user.admin) else user.user
    rows = await gateway.db(gateway.webhooks.active, owner)
    return await gateway.db(gateway.webhooks.public, rows)


@router.get("/{webhook_id}", summary="one webhook, with its delivery counts")
async def get_webhook(webhook_id: str, user: CurrentUser, gateway: GatewayDep) -> WebhookPublic:
    row = await gateway.db(gateway.webhooks.get, None if user.admin else user.user, webhook_id)
    return (await gateway.db(gateway.webhooks.public, [row]))[0]


@router.delete("/{webhook_id}", status_code=status.HTTP_204_NO_CONTENT, summary="remove a webhook")
async def delete_webhook(webhook_id: str, user: CurrentUser, gateway: GatewayDep) -> Response:
    """Its pending deliveries are cancelled; its delivery log is kept."""
    await gateway.db(gateway.webhooks.delete, None if user.admin else user.user, webhook_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{webhook_id}/test", status_code=status.HTTP_202_ACCEPTED, summary="send a test event (type ping)")
async def test_webhook(webhook_id: str, user: CurrentUser, gateway: GatewayDep) -> dict[str, str]:
    event_id = await gateway.test_webhook(user, webhook_id)
    return {"webhook_id": webhook_id, "event_id": event_id}


@router.get("/{webhook_id}/deliveries", summary="the webhook's delivery log: each event, each try, newest first")
async def list_deliveries(
    webhook_id: str,
    user: CurrentUser,
    gateway: GatewayDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> DeliveryPage:
    found = await gateway.db(gateway.webhooks.deliveries, None if user.admin else user.user, webhook_id, limit)
    return DeliveryPage(webhook_id=webhook_id, deliveries=found)
