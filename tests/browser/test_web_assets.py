"""The web front end as the gateway serves it (no browser): pages, assets, caching, security headers,
and the vendored uPlot matching the version pinned for the npm registry."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from choline_api import web
from choline_api.main import ApiService
from choline_core.bus import Bus
from choline_core.embedded import NatsServer
from choline_core.subjects import Subjects
from tests.api.conftest import api_settings, base_url, running

REPO = Path(__file__).resolve().parents[2]
WEB_SRC = REPO / "services" / "api" / "web-src"


@pytest.fixture
async def gateway(
    nats_server: NatsServer, subjects: Subjects, bus: Bus, choline_home: Path
) -> AsyncIterator[httpx.AsyncClient]:
    service = ApiService(api_settings(nats_server, subjects, choline_home))
    async with running(service) as svc, httpx.AsyncClient(base_url=base_url(svc), timeout=10) as client:
        yield client


async def test_pages_are_the_app_with_strict_headers(gateway: httpx.AsyncClient) -> None:
    root = await gateway.get("/")
    assert root.status_code == 307 and root.headers["location"] == "/ui/"
    for path in ("/ui/", "/ui/runs", "/ui/runs/rabc123", "/ui/login?next=/ui/tokens", "/ui/models"):
        resp = await gateway.get(path)  # no token: the page itself is public, the data behind it is not
        assert resp.status_code == 200, path
        assert resp.headers["content-type"].startswith("text/html")
        assert '<script type="module" src="/ui/static/js/main.js">' in resp.text
        csp = resp.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "connect-src 'self'" in csp
        assert resp.headers["referrer-policy"] == "no-referrer"  # stream tokens travel in query strings
        assert resp.headers["x-content-type-options"] == "nosniff"
    # every script and stylesheet the page names is served, from this origin only
    page = (await gateway.get("/ui/")).text
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert refs and all(r.startswith("/ui/static/") for r in refs), refs
    for ref in refs:
        assert (await gateway.get(ref)).status_code == 200, ref
    # and the data is not: the API still wants a token
    assert (await gateway.get("/v1/runs")).status_code == 401


async def test_assets_cache_by_etag_and_unknown_paths_are_404(gateway: httpx.AsyncClient) -> None:
    js = await gateway.get("/ui/static/js/run.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert js.headers["cache-control"] == "no-cache"
    again = await gateway.get("/ui/static/js/run.js", headers={"If-None-Match": js.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    stale = await gateway.get("/ui/static/js/run.js", headers={"If-None-Match": '"0000"'})
    assert stale.status_code == 200 and stale.content == js.content
    css = await gateway.get("/ui/static/vendor/uPlot.min.css")
    assert css.headers["content-type"].startswith("text/css")
    for bad in ("/ui/static/nope.js", "/ui/static/%2e%2e/__init__.py", "/ui/static/..%2f__init__.py", "/ui/static/"):
        resp = await gateway.get(bad)
        assert resp.status_code == 404, bad
        assert resp.json()["type"] == "not_found"  # the shared error body
    dotted = await gateway.get("/ui/static/../__init__.py")  # the client folds it to /ui/__init__.py: a page
    assert "from __future__" not in dotted.text and "<!doctype html>" in dotted.text
    assert "__init__.py" not in web.assets() and all(not p.endswith(".py") for p in web.assets())


async def test_pages_stay_out_of_the_openapi_document(gateway: httpx.AsyncClient) -> None:
    paths = (await gateway.get("/openapi.json")).json()["paths"]
    assert paths and all(p.startswith("/v1/") or p in ("/healthz",) for p in paths), sorted(paths)


def test_vendored_uplot_is_the_pinned_release() -> None:
    pinned = json.loads((WEB_SRC / "package.json").read_text())["dependencies"]["uplot"]
    lock = json.loads((WEB_SRC / "package-lock.json").read_text())["packages"]["node_modules/uplot"]
    assert lock["version"] == pinned and lock["integrity"].startswith("sha512-")
    vendored = (web.STATIC / "vendor" / "uPlot.iife.min.js").read_text()
    assert vendored.startswith(f"/*! https://github.com/leeoniya/uPlot (v{pinned}) */")
    assert (web.STATIC / "vendor" / "uPlot.LICENSE.txt").read_text().startswith("The MIT License")
    # nothing in our pages loads from another origin
    for path, asset in web.assets().items():
        if path.endswith((".js", ".html", ".css")) and not path.startswith("vendor/"):
            text = asset.body.decode()
            assert not re.search(r"""(?:src|href|import)\s*=?\s*\(?["']https?://""", text), path
            assert "innerHTML" not in text, f"{path}: build DOM with text nodes (dom.js h()), never innerHTML"
