"""``pull``: a version of a dataset into a local folder, through presigned URLs from the gateway."""

from __future__ import annotations

import os
from pathlib import Path

from choline_core.pipeline import DatasetManifest, DatasetVersionInfo

from .fetch import FetchResult, check_destination, materialize
from .paths import remember
from .progress import Progress
from .remote import DatasetRemote


def pull(
    name: str,
    dest: str | os.PathLike[str],
    remote: DatasetRemote,
    *,
    version: str | None = None,
    progress: Progress | None = None,
    workers: int = 8,
) -> tuple[DatasetVersionInfo, FetchResult]:
    """Make ``dest`` hold version ``version`` (a digest or a unique prefix; default the newest) of ``name``."""
    dest = Path(dest).expanduser()
    check_destination(dest)
    first = remote.urls(name, version, [])
    info = first.version
    raw = remote.get(first.manifest_url, "the manifest")
    manifest = DatasetManifest.from_bytes(raw, info.manifest)

    def urls(packs: list[str]) -> dict[str, str]:
        return remote.urls(name, info.manifest, packs).urls

    result = materialize(manifest, raw, dest, urls, workers=workers, progress=progress)
    remember(name, dest, info.manifest)
    return info, result
