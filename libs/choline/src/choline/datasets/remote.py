"""The gateway's ``/v1/datasets`` calls (through ``CholineClient``) and PUTs to presigned URLs.

``DatasetRemote`` is everything ``push`` and ``pull`` need from a control plane; the CLI never holds S3 keys.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import httpx

from choline_core import errors
from choline_core.pipeline import (
    MAX_DATASET_BATCH,
    DatasetChunksReply,
    DatasetInfo,
    DatasetRegistered,
    DatasetUploadItem,
    DatasetUrls,
    DatasetVersionInfo,
)

if TYPE_CHECKING:
    from choline.client import CholineClient


def _lenient(model: Any, data: Any) -> Any:
    return model.model_validate(data, context={"lenient": True})


class DatasetRemote:
    def __init__(self, api: CholineClient) -> None:
        self.api = api
        self.id = api.base_url  # what the local journal of uploaded packs is keyed by
        self._http = httpx.Client(
            timeout=httpx.Timeout(30.0, write=300.0, read=120.0),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
        )

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, body: dict[str, Any], timeout: float | None = None) -> Any:
        kwargs: dict[str, Any] = {"json": body}
        if timeout is not None:
            kwargs["timeout"] = timeout
        return self.api._request("POST", path, **kwargs).json()

    # ------------------------------------------------------------------ calls
    def chunks(self, shas: list[str]) -> DatasetChunksReply:
        assert len(shas) <= MAX_DATASET_BATCH
        return _lenient(DatasetChunksReply, self._post("/v1/datasets/chunks", {"chunks": shas}))

    def upload_urls(self, kind: str, digests: list[str], name: str | None = None) -> list[DatasetUploadItem]:
        body: dict[str, Any] = {"kind": kind, "digests": digests}
        if name:
            body["name"] = name
        return [_lenient(DatasetUploadItem, i) for i in self._post("/v1/datasets/uploads", body)["items"]]

    def register(self, packs: list[str]) -> DatasetRegistered:
        return _lenient(DatasetRegistered, self._post("/v1/datasets/packs", {"packs": packs}, timeout=120.0))

    def commit(self, name: str, manifest: str, source: str | None = None) -> DatasetVersionInfo:
        body = {"manifest": manifest, "source": source}
        return _lenient(DatasetVersionInfo, self._post(f"/v1/datasets/{name}/versions", body, timeout=300.0))

    def datasets(self) -> list[DatasetInfo]:
        return [_lenient(DatasetInfo, d) for d in self.api._get("/v1/datasets").get("datasets", [])]

    def dataset(self, name: str) -> DatasetInfo:
        return _lenient(DatasetInfo, self.api._get(f"/v1/datasets/{name}"))

    def urls(self, name: str, manifest: str | None, packs: list[str]) -> DatasetUrls:
        body = {"manifest": manifest, "packs": packs}
        return _lenient(DatasetUrls, self._post(f"/v1/datasets/{name}/urls", body))

    # ------------------------------------------------------------------ bytes
    def put(self, url: str, data: bytes, what: str) -> None:
        """PUT ``data`` to a presigned URL, retrying transport failures and 5xx a few times."""
        delay = 0.5
        for attempt in range(5):
            try:
                resp = self._http.put(url, content=data, headers={"Content-Type": "application/octet-stream"})
            except httpx.TransportError as exc:
                err: Exception = exc
            else:
                if resp.status_code < 300:
                    return
                if resp.status_code < 500:
                    raise errors.StorageError(f"uploading {what} failed: HTTP {resp.status_code} {resp.text[:200]}")
                err = errors.StorageError(f"HTTP {resp.status_code}")
            if attempt == 4:
                raise errors.StorageError(f"uploading {what} failed: {err}", hint="run the push again: it resumes")
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def get(self, url: str, what: str) -> bytes:
        try:
            resp = self._http.get(url)
        except httpx.TransportError as exc:
            raise errors.StorageError(f"downloading {what} failed: {exc}") from exc
        if resp.status_code >= 300:
            raise errors.StorageError(f"downloading {what} failed: HTTP {resp.status_code}")
        return resp.content
