"""``/v1/tokens`` and ``/v1/me``: API tokens (stored hashed; the token is shown once)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from ..deps import CurrentUser, GatewayDep
from ..models import MePublic, TokenCreate, TokenCreated, TokenPublic
from ..store import TokenRow

router = APIRouter(tags=["tokens"])


def _public(row: TokenRow) -> TokenPublic:
    return TokenPublic(
        id=row.id,
        name=row.name,
        user=row.user_id,
        prefix=row.prefix,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
    )


@router.get("/me", summary="who this token belongs to")
def me(user: CurrentUser) -> MePublic:
    return MePublic(user=user.user, admin=user.admin, token_id=user.token_id, token_name=user.token_name)


@router.post("/tokens", status_code=status.HTTP_201_CREATED, summary="create a token (shown once)")
def create_token(body: TokenCreate, user: CurrentUser, gateway: GatewayDep) -> TokenCreated:
    """A new token for yourself; an admin may name another ``user`` (created when new)."""
    row, token = gateway.store.create_token(user, body.name, body.user, body.admin)
    return TokenCreated(**_public(row).model_dump(), token=token)


@router.get("/tokens", summary="your active tokens (never the tokens themselves)")
def list_tokens(
    user: CurrentUser,
    gateway: GatewayDep,
    all: Annotated[bool, Query(description="admin: every user's tokens")] = False,
) -> list[TokenPublic]:
    return [_public(r) for r in gateway.store.list_tokens(user, all_users=all)]


@router.delete("/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT, summary="revoke a token")
def revoke_token(token_id: str, user: CurrentUser, gateway: GatewayDep) -> Response:
    gateway.store.revoke_token(user, token_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
