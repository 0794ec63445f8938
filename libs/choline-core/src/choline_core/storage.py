"""Object storage: one interface, one S3 implementation (the ``minio`` client).

The interface is synchronous and thread-safe (the agent uploads from a background thread);
async code calls it through ``asyncio.to_thread``. Keys are ``/``-separated; a missing key
raises ``ObjectNotFound``, every other S3 failure ``StorageError``.

The commit pattern: ``commit(prefix, files)`` uploads every file, then writes
``<prefix>/manifest.json`` (each file's size and sha256) last. A prefix without a manifest
is incomplete and readers ignore it; ``verify()`` re-checks sizes (and, optionally, hashes).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

from .errors import ObjectNotFound, StorageError

MANIFEST = "manifest.json"
PART_SIZE = 16 * 1024 * 1024
Progress = Callable[[int], None]  # called with the number of bytes just moved


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str | None = None
    last_modified: datetime | None = None
    metadata: Mapping[str, str] | None = None


def sha256_file(path: str | os.PathLike[str], bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


class ObjectStore(ABC):
    """What choline needs of object storage. Every method may raise ``StorageError``."""

    bucket: str

    @abstractmethod
    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (idempotent)."""

    @abstractmethod
    def put_stream(
        self,
        key: str,
        stream: IO[bytes],
        length: int = -1,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        progress: Progress | None = None,
    ) -> ObjectInfo:
        """Upload from a stream; ``length=-1`` streams with multipart in ``PART_SIZE`` parts."""

    @abstractmethod
    def put_file(
        self,
        key: str,
        path: str | os.PathLike[str],
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        progress: Progress | None = None,
    ) -> ObjectInfo:
        """Upload a file; large files go as multipart uploads with parts in parallel."""

    @abstractmethod
    def open(self, key: str, offset: int = 0, length: int | None = None) -> IO[bytes]:
        """A readable stream of the object (or of ``length`` bytes from ``offset``). Close it."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo: ...

    @abstractmethod
    def list(self, prefix: str = "", *, recursive: bool = True) -> Iterator[ObjectInfo]: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete; a missing key is not an error."""

    @abstractmethod
    def presign_get(self, key: str, expires: timedelta = timedelta(hours=1)) -> str: ...

    @abstractmethod
    def presign_put(self, key: str, expires: timedelta = timedelta(hours=1)) -> str: ...

    # ----------------------------------------------------------- conveniences on the primitives
    def put_bytes(
        self, key: str, data: bytes, *, content_type: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> ObjectInfo:
        return self.put_stream(key, io.BytesIO(data), len(data), content_type=content_type, metadata=metadata)

    def put_json(self, key: str, obj: Any) -> ObjectInfo:
        return self.put_bytes(key, json.dumps(obj, sort_keys=True, indent=1).encode(), content_type="application/json")

    def get_bytes(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        stream = self.open(key, offset, length)
        try:
            return stream.read()
        finally:
            stream.close()

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def get_file(self, key: str, path: str | os.PathLike[str], *, progress: Progress | None = None) -> ObjectInfo:
        """Download to ``path`` atomically (a temporary name, fsync, rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part{os.getpid()}")
        info = self.stat(key)
        stream = self.open(key)
        try:
            with open(tmp, "wb") as fh:
                while chunk := stream.read(1 << 20):
                    fh.write(chunk)
                    if progress:
                        progress(len(chunk))
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            stream.close()
        os.replace(tmp, path)
        return info

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    def delete_prefix(self, prefix: str) -> int:
        n = 0
        for obj in list(self.list(prefix)):
            self.delete(obj.key)
            n += 1
        return n

    # ----------------------------------------------------------- the commit pattern
    def commit(
        self,
        prefix: str,
        files: Mapping[str, str | os.PathLike[str] | bytes],
        meta: Mapping[str, Any] | None = None,
        *,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Upload ``files`` (name -> path or bytes) under ``prefix``, then the manifest, last.

        Returns the manifest. Readers treat the prefix as complete only once it exists.
        """
        prefix = prefix.rstrip("/")
        entries = []
        for name in sorted(files):
            if name == MANIFEST or name.startswith("/") or ".." in name.split("/"):
                raise StorageError(f"bad file name in commit: {name!r}")
            src = files[name]
            key = f"{prefix}/{name}"
            if isinstance(src, bytes):
                digest, size = hashlib.sha256(src).hexdigest(), len(src)
                self.put_bytes(key, src)
            else:
                digest, size = sha256_file(src), os.path.getsize(src)
                self.put_file(key, src, progress=progress)
            entries.append({"path": name, "size": size, "sha256": digest})
        manifest = {"files": entries, "created": time.time(), "meta": dict(meta or {})}
        self.put_json(f"{prefix}/{MANIFEST}", manifest)
        return manifest

    def read_manifest(self, prefix: str) -> dict[str, Any] | None:
        """The manifest of a committed prefix, or None when the prefix is not complete."""
        try:
            manifest = self.get_json(f"{prefix.rstrip('/')}/{MANIFEST}")
        except ObjectNotFound:
            return None
        except ValueError as exc:
            raise StorageError(f"manifest under {prefix} is not JSON: {exc}") from exc
        return manifest if isinstance(manifest, dict) else None

    def verify(self, prefix: str, *, hashes: bool = False) -> bool:
        """Whether a committed prefix is intact: every file present with its size (and hash)."""
        manifest = self.read_manifest(prefix)
        if manifest is None:
            return False
        for entry in manifest.get("files", []):
            key = f"{prefix.rstrip('/')}/{entry['path']}"
            try:
                info = self.stat(key)
            except ObjectNotFound:
                return False
            if info.size != entry["size"]:
                return False
            if hashes and hashlib.sha256(self.get_bytes(key)).hexdigest() != entry["sha256"]:
                return False
        return True


class S3Store(ObjectStore):
    """S3 (MinIO, SeaweedFS, AWS, R2, ...) through the ``minio`` client."""

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        *,
        region: str = "us-east-1",
        timeout: float = 30.0,
        retries: int = 2,
    ) -> None:
        import urllib3
        from minio import Minio

        parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        if not parsed.hostname:
            raise StorageError(f"bad S3 endpoint {endpoint!r}: expected http(s)://host:port")
        self.endpoint = f"{parsed.scheme}://{parsed.netloc}"
        self.bucket = bucket
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(5.0, timeout), read=timeout),
            maxsize=16,
            retries=urllib3.Retry(total=retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )
        self._client = Minio(
            parsed.netloc,
            access_key=access_key,
            secret_key=secret_key,
            secure=parsed.scheme == "https",
            region=region,
            http_client=http,
        )

    @classmethod
    def from_settings(cls, settings: Any, bucket: str | None = None) -> S3Store:
        access = settings.secret("s3_access_key")
        secret = settings.secret("s3_secret_key")
        if not access or not secret:
            raise StorageError(
                "no S3 credentials configured",
                hint="run 'choline up', or set CHOLINE_S3_ACCESS_KEY and CHOLINE_S3_SECRET_KEY",
            )
        return cls(settings.s3_endpoint, access, secret, bucket or settings.s3_bucket, region=settings.s3_region)

    def _wrap(self, exc: Exception, key: str) -> Exception:
        from minio.error import S3Error

        if isinstance(exc, S3Error) and exc.code in ("NoSuchKey", "NoSuchObject", "NoSuchBucket", "NotFound"):
            where = "bucket" if exc.code == "NoSuchBucket" else "key"
            return ObjectNotFound(f"no such {where} in {self.bucket}: {key}")
        if isinstance(exc, S3Error):
            return StorageError(f"S3 {exc.code} on {key}: {exc.message}")
        return StorageError(f"S3 at {self.endpoint} failed on {key}: {type(exc).__name__}: {exc}")

    def _call(self, key: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from minio.error import MinioException

        try:
            return fn(*args, **kwargs)
        except (MinioException, OSError, ValueError) as exc:
            raise self._wrap(exc, key) from exc
        except Exception as exc:  # urllib3 errors do not share a base with OSError in every version
            if type(exc).__module__.startswith("urllib3"):
                raise self._wrap(exc, key) from exc
            raise

    def ensure_bucket(self) -> None:
        if not self._call(self.bucket, self._client.bucket_exists, bucket_name=self.bucket):
            try:
                self._call(self.bucket, self._client.make_bucket, bucket_name=self.bucket)
            except StorageError as exc:
                if "BucketAlreadyOwnedByYou" not in str(exc) and "BucketAlreadyExists" not in str(exc):
                    raise

    def put_stream(
        self,
        key: str,
        stream: IO[bytes],
        length: int = -1,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        progress: Progress | None = None,
    ) -> ObjectInfo:
        res = self._call(
            key,
            self._client.put_object,
            bucket_name=self.bucket,
            object_name=key,
            data=_Counting(stream, progress),
            length=length,
            content_type=content_type or "application/octet-stream",
            metadata=dict(metadata) if metadata else None,
            part_size=PART_SIZE if length < 0 else 0,
        )
        return ObjectInfo(key=key, size=length, etag=res.etag)

    def put_file(
        self,
        key: str,
        path: str | os.PathLike[str],
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        progress: Progress | None = None,
    ) -> ObjectInfo:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            res = self._call(
                key,
                self._client.put_object,
                bucket_name=self.bucket,
                object_name=key,
                data=_Counting(fh, progress),
                length=size,
                content_type=content_type or "application/octet-stream",
                metadata=dict(metadata) if metadata else None,
                part_size=PART_SIZE,
                num_parallel_uploads=4,
            )
        return ObjectInfo(key=key, size=size, etag=res.etag)

    def open(self, key: str, offset: int = 0, length: int | None = None) -> IO[bytes]:
        return self._call(
            key, self._client.get_object, bucket_name=self.bucket, object_name=key, offset=offset, length=length or 0
        )

    def get_bytes(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        resp = self.open(key, offset, length)
        try:
            return self._call(key, resp.read)
        finally:
            resp.close()
            resp.release_conn()  # type: ignore[attr-defined]

    def stat(self, key: str) -> ObjectInfo:
        st = self._call(key, self._client.stat_object, bucket_name=self.bucket, object_name=key)
        meta = {
            k[len("x-amz-meta-") :].lower(): v
            for k, v in (st.metadata or {}).items()
            if k.lower().startswith("x-amz-meta-")
        }
        return ObjectInfo(key=key, size=st.size or 0, etag=st.etag, last_modified=st.last_modified, metadata=meta)

    def list(self, prefix: str = "", *, recursive: bool = True) -> Iterator[ObjectInfo]:
        try:
            for obj in self._client.list_objects(bucket_name=self.bucket, prefix=prefix or None, recursive=recursive):
                yield ObjectInfo(
                    key=obj.object_name or "", size=obj.size or 0, etag=obj.etag, last_modified=obj.last_modified
                )
        except Exception as exc:
            raise self._wrap(exc, prefix) from exc

    def delete(self, key: str) -> None:
        try:
            self._call(key, self._client.remove_object, bucket_name=self.bucket, object_name=key)
        except ObjectNotFound:
            pass

    def presign_get(self, key: str, expires: timedelta = timedelta(hours=1)) -> str:
        return str(
            self._call(
                key, self._client.presigned_get_object, bucket_name=self.bucket, object_name=key, expires=expires
            )
        )

    def presign_put(self, key: str, expires: timedelta = timedelta(hours=1)) -> str:
        return str(
            self._call(
                key, self._client.presigned_put_object, bucket_name=self.bucket, object_name=key, expires=expires
            )
        )

    def healthy(self) -> bool:
        try:
            self._client.bucket_exists(bucket_name=self.bucket)
        except Exception:
            return False
        return True


class _Counting(io.RawIOBase):
    """Wraps a stream to report bytes read (upload progress)."""

    def __init__(self, inner: IO[bytes], progress: Progress | None) -> None:
        self._inner = inner
        self._progress = progress

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        data = self._inner.read(size)
        if self._progress and data:
            self._progress(len(data))
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)
