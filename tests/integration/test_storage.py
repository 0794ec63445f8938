"""Object storage contract suite, run against every implementation (today: S3 on weed mini)."""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

import pytest

from choline_core.errors import ObjectNotFound, StorageError
from choline_core.storage import MANIFEST, ObjectStore, S3Store


class StoreContract:
    """Subclass with a ``store`` fixture to run the contract against an implementation."""

    def test_round_trip_bytes_and_json(self, store: ObjectStore) -> None:
        store.put_bytes("a/b.txt", b"hello")
        assert store.get_bytes("a/b.txt") == b"hello"
        assert store.stat("a/b.txt").size == 5
        store.put_json("a/c.json", {"x": [1, 2]})
        assert store.get_json("a/c.json") == {"x": [1, 2]}
        assert store.exists("a/b.txt") and not store.exists("a/zzz")

    def test_ranged_read(self, store: ObjectStore) -> None:
        store.put_bytes("r.bin", bytes(range(256)))
        assert store.get_bytes("r.bin", offset=10, length=5) == bytes([10, 11, 12, 13, 14])

    def test_multipart_file_and_stream(self, store: ObjectStore, tmp_path: Path) -> None:
        src = tmp_path / "big.bin"
        data = os.urandom(1 << 20) * 20  # 20 MiB: more than one 16 MiB part
        src.write_bytes(data)
        moved: list[int] = []
        store.put_file("big/file.bin", src, progress=moved.append)
        assert sum(moved) == len(data)
        dst = tmp_path / "out" / "big.bin"
        store.get_file("big/file.bin", dst)
        assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(data).digest()
        with open(src, "rb") as fh:
            store.put_stream("big/stream.bin", fh)  # unknown length: streamed multipart
        assert store.stat("big/stream.bin").size == len(data)

    def test_list_and_delete(self, store: ObjectStore) -> None:
        for k in ("p/1", "p/2", "p/sub/3", "q/4"):
            store.put_bytes(k, b"x")
        assert sorted(o.key for o in store.list("p/")) == ["p/1", "p/2", "p/sub/3"]
        store.delete("p/1")
        store.delete("p/1")  # idempotent
        assert store.delete_prefix("p/") == 2
        assert [o.key for o in store.list("")] == ["q/4"]

    def test_missing_key_is_typed(self, store: ObjectStore, tmp_path: Path) -> None:
        with pytest.raises(ObjectNotFound):
            store.get_bytes("nope")
        with pytest.raises(ObjectNotFound):
            store.stat("nope")
        with pytest.raises(ObjectNotFound):
            store.get_file("nope", tmp_path / "x")
        assert not (tmp_path / "x").exists()

    def test_presigned_urls(self, store: ObjectStore) -> None:
        put = store.presign_put("signed/obj.bin")
        req = urllib.request.Request(put, data=b"through a presigned url", method="PUT")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
        get = store.presign_get("signed/obj.bin")
        with urllib.request.urlopen(get, timeout=10) as resp:
            assert resp.read() == b"through a presigned url"
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(get.replace("signed/obj.bin", "signed/other.bin"), timeout=10)

    def test_commit_pattern_manifest_last(self, store: ObjectStore, tmp_path: Path) -> None:
        f = tmp_path / "weights.bin"
        f.write_bytes(b"w" * 1000)
        assert store.read_manifest("ck/10") is None
        manifest = store.commit("ck/10", {"weights.bin": f, "meta/state.json": b"{}"}, meta={"step": 10})
        assert [e["path"] for e in manifest["files"]] == ["meta/state.json", "weights.bin"]
        assert store.read_manifest("ck/10")["meta"] == {"step": 10}
        assert store.verify("ck/10", hashes=True)
        # a prefix whose files are there but whose manifest is not is incomplete
        store.put_bytes("ck/20/weights.bin", b"partial")
        assert store.read_manifest("ck/20") is None and not store.verify("ck/20")
        # a file damaged after commit fails verification
        store.put_bytes("ck/10/weights.bin", b"w" * 999)
        assert not store.verify("ck/10")
        with pytest.raises(StorageError):
            store.commit("ck/30", {MANIFEST: b"{}"})
        with pytest.raises(StorageError):
            store.commit("ck/30", {"../escape": b"{}"})


class TestS3Store(StoreContract):
    """The contract on SeaweedFS's S3 API through the minio client."""

    def test_unreachable_endpoint_is_a_storage_error(self) -> None:
        from choline_core.embedded import free_port

        dead = S3Store(f"http://127.0.0.1:{free_port()}", "a", "b", "bucket", timeout=1, retries=0)
        with pytest.raises(StorageError):
            dead.get_bytes("k")

    def test_wrong_credentials_are_refused(self, s3_server, store: S3Store) -> None:  # type: ignore[no-untyped-def]
        bad = S3Store(s3_server.endpoint, s3_server.access_key, "wrong-secret", store.bucket, retries=0)
        with pytest.raises(StorageError) as err:
            bad.put_bytes("x", b"1")
        assert not isinstance(err.value, ObjectNotFound)
