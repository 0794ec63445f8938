"""Datasets on the box: each mounted version is materialised once under the box's datasets folder
(``$CHOLINE_HOME/data/<manifest digest>/``, reused by later runs on the same box) and linked as
``<workdir>/data/<name>``, where ``CHOLINE_DATA_DIR`` and ``choline.data(name)`` point.

The bytes come through URLs the syncer presigns for this run's box (``purpose="dataset"``: the manifest,
then the packs, GET only), fetched by ``choline.datasets.fetch.materialize``: parallel ranged GETs, every
chunk's sha256 checked (a damaged transfer is fetched again), files renamed into place when complete, and
chunks that another version on this box already holds copied instead of downloaded. A kill midway resumes
from its journal. Progress goes to the run's log every few seconds (bytes, rate, ETA).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from pathlib import Path
from typing import TYPE_CHECKING

from choline_core.events import DataMount
from choline_core.pipeline import DatasetManifest, PresignRequest, check_dataset_name

from .transfer import TransferError, get_file

if TYPE_CHECKING:
    from .agent import Agent

KEEP_SOURCES = 4  # older versions on this box whose chunks may be copied


def default_dir() -> Path:
    home = os.environ.get("CHOLINE_HOME") or str(Path.home() / ".choline")
    return Path(home).expanduser() / "data"


async def mount_all(agent: Agent) -> None:
    """Materialise every dataset of the attempt and link it under ``agent.data_dir``."""
    for mount in agent.cfg.data:
        if not mount.manifest:
            continue
        check_dataset_name(mount.name)  # one path component: the link cannot land outside data/
        folder = await materialise(agent, mount)
        link = agent.data_dir / mount.name
        if link.is_symlink() or link.exists():
            if link.is_symlink() and Path(os.readlink(link)) == folder:
                continue
            if link.is_dir() and not link.is_symlink():
                raise RuntimeError(f"{link} is a folder, not a dataset link")
            link.unlink()
        link.symlink_to(folder)


async def materialise(agent: Agent, mount: DataMount) -> Path:
    from choline.datasets.fetch import materialize, read_state
    from choline.datasets.progress import LogProgress, human

    assert mount.manifest
    digest = mount.manifest
    root = Path(agent.cfg.datasets_dir).expanduser() if agent.cfg.datasets_dir else default_dir()
    root.mkdir(parents=True, exist_ok=True)
    dest = root / digest
    state, _ = await asyncio.to_thread(read_state, dest)
    if state.get("manifest") == digest:
        agent.say(f"dataset {mount.name} {digest[:12]}: already on this box")
        return dest
    loop = asyncio.get_running_loop()

    async def presign(packs: list[str]) -> dict[str, str]:
        request = PresignRequest(attempt=agent.cfg.attempt, purpose="dataset", method="GET", digest=digest, files=packs)
        return (await agent.presign(request)).urls

    def urls(packs: list[str]) -> dict[str, str]:
        return asyncio.run_coroutine_threadsafe(presign(packs), loop).result()

    cached = agent.cache_dir / f"dataset-{digest}.json.gz"
    for attempt in range(5):
        first = await presign([])
        try:
            await asyncio.to_thread(get_file, first["manifest"], cached)
            break
        except TransferError as exc:
            if not exc.retryable or attempt == 4:
                raise
            await asyncio.sleep(1.0 + attempt)
    raw = cached.read_bytes()
    manifest = DatasetManifest.from_bytes(raw, digest)
    sources = sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name != digest and (p / ".choline-dataset").is_dir()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )[:KEEP_SOURCES]
    agent.say(f"dataset {mount.name} {digest[:12]}: {len(manifest.files)} files, {human(manifest.size)}")
    progress = LogProgress(agent.say)
    with _locked(root / f".{digest}.lock"):
        result = await asyncio.to_thread(materialize, manifest, raw, dest, urls, sources=sources, progress=progress)
    agent.say(
        f"dataset {mount.name}: ready in {result.seconds:.1f}s; downloaded {human(result.fetched_bytes)} "
        f"({human(result.fetched_bytes / max(result.seconds, 1e-3))}/s), reused {human(result.local_bytes)} "
        f"from this box{f', {result.refetched} range(s) fetched again' if result.refetched else ''}"
    )
    return dest


@contextlib.contextmanager
def _locked(path: Path):  # type: ignore[no-untyped-def]
    """One agent at a time materialises a version (two runs on one box share the folder)."""
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
