"""The web front end: the pages and their static assets, served by the gateway itself.

``/`` redirects to ``/ui/``; every ``/ui/...`` page answers the same ``index.html`` (a small
single-page app of plain ES modules that routes on the path), and ``/ui/static/...`` answers the
files under ``static/`` (our JS and CSS, and uPlot vendored from the npm registry by
``make web-vendor``). The browser never fetches anything from another origin: the pages talk to
``/v1`` with the user's bearer token (kept in ``sessionStorage``, or ``localStorage`` when asked),
and follow logs and metrics with ``EventSource`` and a stream token.

Only files listed at import time are served (no path from the URL ever reaches the file system),
each with a strong ETag (``If-None-Match`` answers 304) and ``Cache-Control: no-cache``, so a new
release is picked up at once and an unchanged one costs a 304. Every page carries a strict
Content-Security-Policy: scripts only from this origin, no inline script, no framing, no referrer
(the stream token travels in a query string). The routes stay out of the OpenAPI document.
"""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import RedirectResponse, Response

from choline_core.errors import NotFound

STATIC = Path(__file__).resolve().parent / "static"
INDEX = "index.html"
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
    ".json": "application/json",
}
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


@cache
def assets() -> dict[str, Asset]:
    """Every file under ``static/`` by its path relative to it (read once per process)."""
    found: dict[str, Asset] = {}
    for path in sorted(STATIC.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        media = TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        body = path.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        found[path.relative_to(STATIC).as_posix()] = Asset(body, media, etag)
    return found


def _answer(asset: Asset, if_none_match: str | None) -> Response:
    headers = {"ETag": asset.etag, "Cache-Control": "no-cache", **SECURITY_HEADERS}
    if if_none_match and asset.etag in (t.strip() for t in if_none_match.split(",")):
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui")
def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/static/{path:path}")
def static(path: str, if_none_match: Annotated[str | None, Header()] = None) -> Response:
    asset = assets().get(path)
    if asset is None:
        raise NotFound(f"no file {path!r} in the web front end")
    return _answer(asset, if_none_match)


@router.get("/ui/{page:path}")
def page(page: str, if_none_match: Annotated[str | None, Header()] = None) -> Response:
    """Every page of the app is ``index.html``; the script renders the page the path names."""
    return _answer(assets()[INDEX], if_none_match)
