"""The HTTP face of the emulator: the subset of vast.ai's REST API the ``vastai`` SDK and CLI use,
and an ``/admin`` API for tests and demos to inject faults.

Every route needs the account's API key (``Authorization: Bearer KEY``, or ``?api_key=KEY`` as
older clients send it); without it: 401 ``{"success": false, "error": "invalid_user_key"}``.
API routes (not ``/admin``) go through the fault gate first (``Faults.error_rate``). Errors
answer vast's shape ``{"success": false, "error": CODE, "msg": TEXT}``, which the CLI prints.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Body, Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from .catalog import QueryError
from .core import ApiError, Emulator, Faults, query_error

TICK_S = 0.1


def create_app(emulator: Emulator, api_key: str, *, close_on_shutdown: bool = True) -> FastAPI:
    """The FastAPI app serving ``emulator`` to clients holding ``api_key``.

    On shutdown it destroys every instance (``close_on_shutdown``), so nothing keeps running.
    """
    if not api_key:
        raise ValueError("the emulator needs an API key")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def ticker() -> None:
            while True:
                await asyncio.sleep(TICK_S)
                await asyncio.to_thread(emulator.tick)

        task = asyncio.create_task(ticker())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if close_on_shutdown:
                await asyncio.to_thread(emulator.close)

    app = FastAPI(title="vast.ai emulator", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.emulator = emulator

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    def authorize(request: Request) -> None:
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else request.query_params.get("api_key")
        if not given or not secrets.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(401, "invalid_user_key", "Please log in or sign up: invalid or missing API key")

    def vast(route: str) -> Callable[[Request], None]:
        """Dependency of an API route: the key, then the fault gate."""

        def gate(request: Request) -> None:
            authorize(request)
            fault = emulator.api_fault(route)
            if fault is not None:
                raise fault

        return gate

    def done(route: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Answer a call that changed something, unless its reply gets lost on the way."""
        if emulator.lost_reply(route):
            raise ApiError(502, "bad_gateway", "upstream connection lost (emulated)")
        return payload

    def search(query: dict[str, Any]) -> dict[str, Any]:
        try:
            return {"offers": emulator.search(query)}
        except QueryError as exc:
            raise query_error(exc) from None

    # --- offers ----------------------------------------------------------------------------------
    @app.post("/api/v0/bundles/", dependencies=[Depends(vast("search"))])
    def bundles(query: dict[str, Any] | None = Body(default=None)) -> dict[str, Any]:
        return search(query or {})

    @app.put("/api/v0/search/asks/", dependencies=[Depends(vast("search"))])
    def search_asks(body: dict[str, Any] | None = Body(default=None)) -> dict[str, Any]:
        q = (body or {}).get("q") or {}
        if not isinstance(q, dict):
            raise ApiError(400, "invalid_query", "q must be an object")
        return search(q)

    # --- instances -------------------------------------------------------------------------------
    @app.put("/api/v0/asks/{ask_id}/", dependencies=[Depends(vast("create"))])
    def create(ask_id: int, body: dict[str, Any] | None = Body(default=None)) -> dict[str, Any]:
        iid = emulator.create(ask_id, body or {})
        return done("create", {"success": True, "new_contract": iid, "instance_api_key": None, "ask_id": ask_id})

    @app.get("/api/v1/instances/", dependencies=[Depends(vast("list"))])
    def instances_v1(request: Request) -> dict[str, Any]:
        params = {k: _json_arg(k, v) for k, v in request.query_params.items() if k != "api_key"}
        filters = params.get("select_filters") or {}
        order = params.get("order_by") or [{"col": "id", "dir": "asc"}]
        if not isinstance(filters, dict) or not isinstance(order, list):
            raise ApiError(400, "invalid_args", "select_filters must be an object and order_by a list")
        try:
            limit = max(1, min(int(params.get("limit") or 25), 1000))
            start = _token_offset(params.get("after_token"))
            from .catalog import matches, order_rows

            rows = [r for r in emulator.rows() if matches(r, filters)]
            rows = order_rows(rows, [[o.get("col", "id"), o.get("dir", "asc")] for o in order if isinstance(o, dict)])
        except QueryError as exc:
            raise query_error(exc) from None
        except (TypeError, ValueError) as exc:
            raise ApiError(400, "invalid_args", str(exc)) from None
        page = rows[start : start + limit]
        cols = params.get("select_cols")
        if isinstance(cols, list) and cols and cols != ["*"]:
            page = [{c: r.get(c) for c in cols} for r in page]
        more = start + limit < len(rows)
        labels: dict[str, int] = {}
        for r in rows:
            labels[r.get("label") or ""] = labels.get(r.get("label") or "", 0) + 1
        return {
            "instances": page,
            "next_token": _token(start + limit) if more else None,
            "total_instances": len(rows),
            "label_counts": labels,
        }

    @app.get("/api/v0/instances/", dependencies=[Depends(vast("list"))])
    def instances_v0() -> dict[str, Any]:
        return {"instances": emulator.rows()}

    @app.get("/api/v0/instances/{iid}/", dependencies=[Depends(vast("show"))])
    def show(iid: int) -> dict[str, Any]:
        inst = emulator.get(iid)
        return {"instances": emulator.row(inst) if inst is not None else None}

    @app.put("/api/v0/instances/{iid}/", dependencies=[Depends(vast("manage"))])
    def manage(iid: int, body: dict[str, Any] | None = Body(default=None)) -> dict[str, Any]:
        body = body or {}
        if "state" in body:
            emulator.set_state(iid, str(body["state"]))
        elif "label" in body:
            emulator.set_label(iid, body["label"])
        else:
            raise ApiError(400, "invalid_args", "expected 'state' or 'label'")
        return done("manage", {"success": True})

    @app.delete("/api/v0/instances/{iid}/", dependencies=[Depends(vast("destroy"))])
    def destroy(iid: int) -> dict[str, Any]:
        emulator.destroy(iid)
        return done("destroy", {"success": True})

    @app.post("/api/v0/instances/{iid}/ssh/", dependencies=[Depends(vast("attach"))])
    def attach(iid: int, body: dict[str, Any] | None = Body(default=None)) -> dict[str, Any]:
        emulator.attach_key(iid, str((body or {}).get("ssh_key") or ""))
        return done("attach", {"success": True, "msg": "SSH key attached"})

    # --- account ---------------------------------------------------------------------------------
    @app.get("/api/v0/ssh/", dependencies=[Depends(vast("keys"))])
    def keys() -> list[dict[str, Any]]:
        return [{"id": k, "public_key": v} for k, v in sorted(emulator.account_keys.items())]

    @app.post("/api/v0/ssh/", dependencies=[Depends(vast("keys"))])
    def add_key(body: dict[str, Any] | None = Body(default=None)) -> dict[str, Any]:
        return done("keys", {"success": True, "key": emulator.add_account_key(str((body or {}).get("ssh_key") or ""))})

    @app.delete("/api/v0/ssh/{kid}/", dependencies=[Depends(vast("keys"))])
    def delete_key(kid: int) -> dict[str, Any]:
        with emulator.lock:
            if emulator.account_keys.pop(kid, None) is None:
                raise ApiError(404, "no_such_key", f"ssh key {kid} not found")
        return {"success": True}

    @app.get("/api/v0/users/current", dependencies=[Depends(vast("user"))])
    @app.get("/api/v0/users/current/", dependencies=[Depends(vast("user"))])
    def user() -> dict[str, Any]:
        bill = emulator.billing()
        return {"id": 1, "username": "emulated", "email": "user@emulator.invalid", "credit": 100.0, **bill}

    # --- admin (not part of vast.ai) -------------------------------------------------------------
    admin = [Depends(authorize)]

    @app.get("/admin/state", dependencies=admin)
    def state() -> dict[str, Any]:
        with emulator.lock:
            return {
                "faults": emulator.faults.model_dump(),
                "instances": [{**emulator.box_info(i), "row": emulator.row(i)} for i in emulator.instances.values()],
                "offers": len(emulator.offers),
                "offline_machines": sorted(emulator.offline_machines),
                "billing": emulator.billing(),
                "stats": dict(emulator.stats),
                "leftovers": emulator.leftovers(),
            }

    @app.get("/admin/faults", dependencies=admin)
    def get_faults() -> dict[str, Any]:
        return emulator.faults.model_dump()

    @app.put("/admin/faults", dependencies=admin)
    def put_faults(body: dict[str, Any] | None = Body(default=None), replace: bool = False) -> dict[str, Any]:
        try:
            return emulator.set_faults(body or {}, merge=not replace).model_dump()
        except ValueError as exc:
            raise ApiError(400, "invalid_args", str(exc).splitlines()[0] if str(exc) else "bad faults") from None

    @app.post("/admin/instances/{iid}/offline", dependencies=admin)
    def instance_offline(iid: int) -> dict[str, Any]:
        emulator.take_offline(iid)
        return {"success": True}

    @app.post("/admin/machines/{machine_id}/offline", dependencies=admin)
    def machine_offline(machine_id: int) -> dict[str, Any]:
        return {"success": True, "instances": emulator.machine_offline(machine_id)}

    @app.post("/admin/machines/{machine_id}/online", dependencies=admin)
    def machine_online(machine_id: int) -> dict[str, Any]:
        emulator.machine_online(machine_id)
        return {"success": True}

    @app.post("/admin/offers", dependencies=admin)
    def add_offer(body: dict[str, Any] | None = Body(default=None)) -> dict[str, Any]:
        try:
            return emulator.add_offer(body or {})
        except ValueError as exc:
            raise ApiError(400, "invalid_args", str(exc)) from None

    @app.delete("/admin/offers/{ask_id}", dependencies=admin)
    def remove_offer(ask_id: int) -> dict[str, Any]:
        if not emulator.remove_offer(ask_id):
            raise ApiError(404, "no_such_ask", f"offer {ask_id} not found")
        return {"success": True}

    return app


def _json_arg(name: str, value: str) -> Any:
    """Query arguments arrive JSON-encoded (the SDK's ``_build_url``), bare strings otherwise."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def _token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode()


def _token_offset(token: Any) -> int:
    if not token:
        return 0
    try:
        kind, _, number = base64.urlsafe_b64decode(str(token).encode()).decode().partition(":")
        if kind == "o":
            return max(int(number), 0)
    except (ValueError, UnicodeDecodeError):
        pass
    raise ValueError(f"after_token {token!r} is not a token this API gave out")


__all__ = ["Faults", "create_app"]
