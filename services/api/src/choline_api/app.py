"""The gateway's FastAPI app: ``/v1`` routers, ``/healthz``, ``/metrics``, one error body.

Every failure answers ``{type, message, detail}``: a ``CholineError`` with its own status
(``http_status``), a request that does not validate with 422 (``type: validation_error``), an
unknown path with 404, anything unexpected with 500 (``type: bug``; the traceback goes to the
log, never to the client).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from choline_core.errors import CholineError, Unauthorized, UserError
from choline_svc.service import metrics_body

from . import web
from .models import ErrorBody
from .routes import advice, datasets, deployments, findings, infra, logs, models, runs, tokens, webhooks

if TYPE_CHECKING:
    from .main import ApiService

log = logging.getLogger(__name__)

_HTTP_KINDS = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": what}
    for code, what in (
        (400, "bad input"),
        (401, "no token, or an unknown one"),
        (404, "no such resource (or not yours)"),
        (422, "the request does not validate"),
        (503, "a service behind the gateway is not answering"),
    )
}


def _error(
    status: int, kind: str, message: str, detail: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"type": kind, "message": message, "detail": detail}, status_code=status, headers=headers)


async def on_choline_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CholineError)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    if exc.http_status >= 500:
        log.warning("%s %s: %s", request.method, request.url.path, exc.one_line())
    body = exc.to_body()
    return _error(exc.http_status, body["type"], body["message"], body["detail"], headers)


async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [
        {"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))}
        for err in exc.errors()
    ]
    first = problems[0] if problems else {"loc": [], "msg": "invalid request"}
    where = ".".join(p for p in first["loc"] if p not in ("body", "query", "path")) or "request"
    return _error(422, "validation_error", f"{where}: {first['msg']}", problems)


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = _HTTP_KINDS.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    return _error(exc.status_code, kind, message, headers=getattr(exc, "headers", None))


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    return _error(500, "bug", "the gateway failed unexpectedly (see the api log)")


class TooLarge(UserError):
    http_status = 413
    kind = "too_large"


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes, declared (Content-Length) or streamed (chunked),
    with 413 and the shared error body."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = _error(413, TooLarge.kind, self._message())
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise TooLarge(self._message())
            return message

        await self.app(scope, counted, send)

    def _message(self) -> str:
        return f"the request body is over the gateway's limit of {self.limit} bytes"


def create_app(service: ApiService) -> FastAPI:
    app = FastAPI(
        title="choline",
        version="1",
        summary="Train and ship ML models on rented GPUs.",
        description="Every endpoint but /healthz needs `Authorization: Bearer <token>`.",
        responses=ERROR_RESPONSES,
    )
    app.state.service = service
    app.add_middleware(BodyLimit, limit=service.settings.api_max_body)
    app.add_exception_handler(CholineError, on_choline_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)

    @app.get("/healthz", tags=["health"], summary="liveness and readiness (no token needed)")
    def healthz() -> JSONResponse:
        ok, payload = service.health()
        return JSONResponse(payload, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", include_in_schema=False)
    def metrics() -> Response:
        body, content_type = metrics_body()
        return Response(body, media_type=content_type)

    for router in (runs.router, logs.router, findings.router, webhooks.router, tokens.router, infra.router):
        app.include_router(router, prefix="/v1")
    app.include_router(datasets.router, prefix="/v1")
    app.include_router(models.router, prefix="/v1")  # model versions (issue 17)
    app.include_router(deployments.router, prefix="/v1")  # deployments and the predict proxy (issue 17)
    app.include_router(advice.router, prefix="/v1")  # the monitor's advisor and a run's policy (issue 15)
    app.include_router(web.router)  # the web front end: / and /ui/... (issue 13)
    return app
