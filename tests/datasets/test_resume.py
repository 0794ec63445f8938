"""Interrupted pushes and pulls (SIGKILL at a fault barrier, through the real CLI) finish when run again
without sending what is already stored; damaged transfers and damaged packs are caught by their hashes."""

from __future__ import annotations

import http.client
import http.server
import json
import random
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from choline.datasets.fetch import materialize
from choline.datasets.push import push
from choline.datasets.remote import DatasetRemote
from choline.datasets.state import LocalState
from choline_core.errors import Forbidden, StorageError
from choline_core.pipeline import DatasetManifest, manifest_key, pack_key
from choline_core.storage import S3Store

from .conftest import ControlPlane, snapshot

pytestmark = [pytest.mark.slow]


def random_tree(root: Path, seed: int, files: int = 5, size: int = 11 << 20) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for i in range(files):
        (root / f"part-{i}.bin").write_bytes(rng.randbytes(size + i))
    return root


def packs_in(objects: S3Store) -> set[str]:
    return {o.key.rsplit("/", 1)[1] for o in objects.list("data/packs/")}


def test_push_killed_midway_resumes_without_resending(
    controlplane: ControlPlane, tmp_path: Path, objects: S3Store
) -> None:
    src = random_tree(tmp_path / "src", seed=11)
    before = packs_in(objects)
    # killed right after the 2nd pack's PUT, before the syncer indexed it (others may be in flight)
    out = controlplane.cli("data", "push", str(src), "killed", CHOLINE_FAULTS="datasets.push.after_put=crash@2")
    assert out.returncode == -9, out.stderr
    time.sleep(1.0)  # a PUT whose body was all sent before the kill may still be landing
    stored = packs_in(objects) - before
    assert len(stored) >= 2
    out = controlplane.cli("data", "push", str(src), "killed", "--json")
    assert out.returncode == 0, out.stderr
    second = json.loads(out.stdout)
    assert second["resumed_packs"] >= 1  # PUT before the kill, indexed only now
    raw = objects.get_bytes(manifest_key("killed", second["manifest"]))
    final = DatasetManifest.from_bytes(raw, second["manifest"])
    # every pack stored before the kill is used; the second run sent only the rest
    assert stored <= set(final.packs)
    assert second["packs_sent"] == len(set(final.packs) - stored)
    assert packs_in(objects) - before == set(final.packs)
    pulled = controlplane.cli("data", "pull", "killed", str(tmp_path / "back"))
    assert pulled.returncode == 0, pulled.stderr
    assert snapshot(tmp_path / "back") == snapshot(src)


def test_pull_killed_midway_resumes_without_refetching(controlplane: ControlPlane, tmp_path: Path) -> None:
    src = random_tree(tmp_path / "src", seed=12, files=3)
    assert controlplane.cli("data", "push", str(src), "interrupted").returncode == 0
    dest = tmp_path / "dest"
    out = controlplane.cli(
        "data", "pull", "interrupted", str(dest), CHOLINE_FAULTS="datasets.fetch.after_range=crash@2"
    )
    assert out.returncode == -9, out.stderr
    part = dest / "part-0.bin"  # a file is in place whole, or not at all
    assert not part.exists() or part.stat().st_size == (src / "part-0.bin").stat().st_size
    out = controlplane.cli("data", "pull", "interrupted", str(dest), "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    # the two ranges written before the kill are kept (a range is up to 8 MiB, smaller at a pack's end)
    assert got["resumed_bytes"] > 0
    assert got["fetched_bytes"] + got["resumed_bytes"] <= got["size"] + (256 << 10)
    assert snapshot(dest) == snapshot(src)


class _CorruptingProxy(http.server.BaseHTTPRequestHandler):
    """Forwards GETs to the S3 server (with its Host header, so presigned signatures hold) and flips a
    byte in the first ``server.damage`` answers."""

    def do_GET(self) -> None:
        srv = self.server
        conn = http.client.HTTPConnection(srv.upstream, timeout=30)  # type: ignore[attr-defined]
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("range",)}
        conn.request("GET", self.path, headers=headers)
        resp = conn.getresponse()
        body = bytearray(resp.read())
        with srv.lock:  # type: ignore[attr-defined]
            if srv.damage > 0 and resp.status in (200, 206) and body:  # type: ignore[attr-defined]
                srv.damage -= 1  # type: ignore[attr-defined]
                body[len(body) // 2] ^= 0x55
        self.send_response(resp.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(bytes(body))
        conn.close()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def proxy(objects: S3Store) -> Iterator[http.server.ThreadingHTTPServer]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CorruptingProxy)
    srv.upstream = urllib.parse.urlsplit(objects.endpoint).netloc  # type: ignore[attr-defined]
    srv.lock = threading.Lock()  # type: ignore[attr-defined]
    srv.damage = 0  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_corrupted_transfer_is_detected_and_fetched_again(
    tmp_path: Path, remote: DatasetRemote, state: LocalState, proxy: http.server.ThreadingHTTPServer
) -> None:
    src = random_tree(tmp_path / "src", seed=13, files=2, size=3 << 20)
    pushed = push(src, "damaged-wire", remote, state=state)
    first = remote.urls("damaged-wire", pushed.manifest, [])
    raw = remote.get(first.manifest_url, "manifest")
    manifest = DatasetManifest.from_bytes(raw, pushed.manifest)
    port = proxy.server_address[1]

    def via_proxy(packs: list[str]) -> dict[str, str]:
        urls = remote.urls("damaged-wire", pushed.manifest, packs).urls
        return {p: urllib.parse.urlsplit(u)._replace(netloc=f"127.0.0.1:{port}").geturl() for p, u in urls.items()}

    proxy.damage = 2  # type: ignore[attr-defined]
    got = materialize(manifest, raw, tmp_path / "dst", via_proxy, workers=2)
    assert got.refetched == 2
    assert snapshot(tmp_path / "dst") == snapshot(src)
    proxy.damage = 10**6  # type: ignore[attr-defined]  # every answer damaged: give up with a clear error
    with pytest.raises(StorageError, match="does not match its sha256"):
        materialize(manifest, raw, tmp_path / "dst2", via_proxy, workers=2)


def test_bad_pack_is_refused_and_deleted(tmp_path: Path, remote: DatasetRemote, objects: S3Store) -> None:
    from choline.datasets.packs import PackBuilder

    b = PackBuilder()
    b.add("0" * 64, b"these bytes do not hash to zeros")  # an index that lies about its chunk
    pack = b.finish()
    item = remote.upload_urls("pack", [pack.digest])[0]
    assert not item.exists and item.url
    remote.put(item.url, pack.data, "a bad pack")
    reply = remote.register([pack.digest])
    assert reply.bad == [pack.digest] and not reply.packs
    assert not objects.exists(pack_key(pack.digest))
    assert remote.chunks(["0" * 64]).found == {}
    never = "f" * 64
    assert remote.register([never]).missing == [never]


def test_urls_only_for_the_versions_own_packs(tmp_path: Path, remote: DatasetRemote, state: LocalState) -> None:
    a = push(random_tree(tmp_path / "a", seed=14, files=1, size=1 << 20), "owner-a", remote, state=state)
    b = push(random_tree(tmp_path / "b", seed=15, files=1, size=1 << 20), "owner-b", remote, state=state)
    foreign = remote.urls("owner-b", b.manifest, []).version
    packs_b = DatasetManifest.from_bytes(
        remote.get(remote.urls("owner-b", b.manifest, []).manifest_url, "m"), foreign.manifest
    ).packs
    with pytest.raises(Forbidden):
        remote.urls("owner-a", a.manifest, packs_b)
