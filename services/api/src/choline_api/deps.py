"""FastAPI dependencies: the gateway's service layer, and who is calling (``Annotated`` aliases)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from choline_core.errors import Retryable, Unauthorized

from .gateway import Gateway
from .store import Principal

_bearer = HTTPBearer(auto_error=False, description="a choline API token: 'choline tokens create NAME'")


def get_gateway(request: Request) -> Gateway:
    gateway: Gateway | None = getattr(request.app.state.service, "gateway", None)
    if gateway is None:
        raise Retryable("the gateway is starting", hint="try again in a moment")
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


def get_current_user(
    gateway: GatewayDep, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    """The caller, from ``Authorization: Bearer <token>``. A sync dependency: FastAPI runs it in
    a worker thread, so the database lookup never blocks the event loop."""
    if creds is None or not creds.credentials:
        raise Unauthorized(
            "this endpoint needs a token (Authorization: Bearer <token>)",
            hint="'choline up' writes an admin token; 'choline tokens create NAME' makes more",
        )
    principal = gateway.store.authenticate(creds.credentials)
    if principal is None:
        raise Unauthorized("the token is unknown or revoked", hint="'choline login URL TOKEN' with a valid token")
    return principal


CurrentUser = Annotated[Principal, Depends(get_current_user)]


def get_stream_user(
    run_id: str,
    gateway: GatewayDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    stream_token: Annotated[
        str | None,
        Query(max_length=512, description="instead of a bearer header (EventSource): POST /v1/runs/{id}/stream-token"),
    ] = None,
) -> Principal:
    """The caller of a follow endpoint: a bearer token, or a stream token for this run (browsers'
    ``EventSource`` cannot send headers). A stream token dies with the token it was made from."""
    if creds is not None and creds.credentials:
        return get_current_user(gateway, creds)
    if not stream_token:
        return get_current_user(gateway, None)
    claim = gateway.stream_tokens.verify(stream_token, run_id)
    principal = gateway.store.principal_for_token_id(claim.token_id)
    if principal is None or principal.user != claim.user:
        raise Unauthorized("the token this stream token came from is revoked", hint="log in again")
    return principal


StreamUser = Annotated[Principal, Depends(get_stream_user)]
