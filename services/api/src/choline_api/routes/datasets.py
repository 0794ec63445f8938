"""``/v1/datasets``: list and show datasets, and the calls ``choline data push|pull`` make (which chunks are
stored, where to upload packs and manifests, registering packs, committing a version, download URLs).

Thin: each route asks the syncer (which owns datasets) over NATS. A user sees and writes their own datasets
(an admin sees every owner's); the chunk lookup is shared, since chunks are content-addressed.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from fastapi import APIRouter, Path, status
from pydantic import BaseModel, ConfigDict
from pydantic import Field as PField

from choline_core import pipeline, rpc
from choline_core.errors import Bug, BusError, NotFound
from choline_core.events import Event
from choline_core.pipeline import DatasetInfo, DatasetVersionInfo

from ..deps import CurrentUser, GatewayDep
from ..gateway import Gateway
from ..store import Principal

router = APIRouter(prefix="/datasets", tags=["datasets"])

R = TypeVar("R", bound=Event)
SHA = r"^[0-9a-f]{64}$"
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$"
DatasetName = Annotated[str, Path(pattern=NAME, description="the dataset's name")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChunksCreate(_Body):
    chunks: list[Annotated[str, PField(pattern=SHA)]] = PField(max_length=pipeline.MAX_DATASET_BATCH)


class ChunksPublic(BaseModel):
    packs: list[str]
    found: dict[str, tuple[int, int, int]] = PField(description="chunk sha256 -> [index in packs, offset, length]")


class UploadCreate(_Body):
    kind: Literal["pack", "manifest"]
    name: str | None = PField(default=None, pattern=NAME, description="the dataset, for a manifest")
    digests: list[Annotated[str, PField(pattern=SHA)]] = PField(max_length=pipeline.MAX_DATASET_BATCH)


class UploadPage(BaseModel):
    items: list[pipeline.DatasetUploadItem]


class PacksCreate(_Body):
    packs: list[Annotated[str, PField(pattern=SHA)]] = PField(max_length=64)


class PacksPublic(BaseModel):
    packs: list[str]
    missing: list[str]
    bad: list[str]
    chunks: int


class VersionCreate(_Body):
    manifest: str = PField(pattern=SHA, description="sha256 of the manifest's canonical JSON")
    source: str | None = PField(default=None, max_length=1024)


class UrlsCreate(_Body):
    manifest: str | None = PField(default=None, pattern=r"^[0-9a-f]{1,64}$", description="digest or prefix")
    packs: list[Annotated[str, PField(pattern=SHA)]] = PField(default_factory=list, max_length=500)
    expires_s: int = PField(default=4 * 3600, ge=60, le=7 * 24 * 3600)


class UrlsPublic(BaseModel):
    version: DatasetVersionInfo
    manifest_url: str
    urls: dict[str, str]


class DatasetPage(BaseModel):
    datasets: list[DatasetInfo]


async def _call(gateway: Gateway, method: str, request: Event, reply: type[R], timeout: float | None = None) -> R:
    """``Gateway.call`` with a longer timeout where the syncer reads packs back or HEADs many objects."""
    if timeout is None:
        return await gateway.call(rpc.SYNCER, method, request, reply)
    try:
        env = await gateway.bus.request(gateway.subjects.rpc(rpc.SYNCER, method), request, timeout=timeout)
    except BusError as exc:
        raise BusError(f"the syncer is not answering ({method}): {exc.message}", hint="check 'choline status'") from exc
    rpc.raise_for_error(env)
    if env.type != reply.TYPE:
        raise Bug(f"the syncer answered {method} with a {env.type!r} message, not {reply.TYPE!r}")
    return env.event(reply)


def _reader(user: Principal) -> str | None:
    return None if user.admin else user.user


@router.get("", summary="your datasets, each with its newest version")
async def list_datasets(user: CurrentUser, gateway: GatewayDep) -> DatasetPage:
    found = await _call(
        gateway, pipeline.SYNCER_DATASETS, pipeline.DatasetsQuery(owner=_reader(user)), pipeline.DatasetList
    )
    return DatasetPage(datasets=found.datasets)


@router.get("/{name}", summary="one dataset and every version of it, newest first")
async def get_dataset(name: DatasetName, user: CurrentUser, gateway: GatewayDep) -> DatasetInfo:
    query = pipeline.DatasetsQuery(owner=_reader(user), name=name)
    found = await _call(gateway, pipeline.SYNCER_DATASETS, query, pipeline.DatasetList)
    if not found.datasets:
        raise NotFound(f"no dataset {name!r}", hint="'choline data ls' lists yours")
    return found.datasets[0]


@router.post("/chunks", summary="which of these chunks are stored, and where")
async def lookup_chunks(body: ChunksCreate, user: CurrentUser, gateway: GatewayDep) -> ChunksPublic:
    reply = await _call(
        gateway,
        pipeline.SYNCER_DATASET_CHUNKS,
        pipeline.DatasetChunksQuery(chunks=body.chunks),
        pipeline.DatasetChunksReply,
    )
    return ChunksPublic(packs=reply.packs, found=reply.found)


@router.post("/uploads", summary="presigned PUTs for packs or a manifest (or that they are stored already)")
async def upload_urls(body: UploadCreate, user: CurrentUser, gateway: GatewayDep) -> UploadPage:
    query = pipeline.DatasetUploadQuery(kind=body.kind, name=body.name, digests=body.digests)
    reply = await _call(gateway, pipeline.SYNCER_DATASET_UPLOAD, query, pipeline.DatasetUploadReply)
    return UploadPage(items=reply.items)


@router.post("/packs", summary="index uploaded packs (each is read back and every chunk checked)")
async def register_packs(body: PacksCreate, user: CurrentUser, gateway: GatewayDep) -> PacksPublic:
    query = pipeline.DatasetRegister(packs=body.packs)
    reply = await _call(gateway, pipeline.SYNCER_DATASET_REGISTER, query, pipeline.DatasetRegistered, timeout=110.0)
    return PacksPublic(packs=reply.packs, missing=reply.missing, bad=reply.bad, chunks=reply.chunks)


@router.post(
    "/{name}/versions", status_code=status.HTTP_201_CREATED, summary="commit an uploaded manifest as the newest version"
)
async def commit_version(
    name: DatasetName, body: VersionCreate, user: CurrentUser, gateway: GatewayDep
) -> DatasetVersionInfo:
    query = pipeline.DatasetCommit(name=name, manifest=body.manifest, owner=user.user, source=body.source)
    reply = await _call(gateway, pipeline.SYNCER_DATASET_COMMIT, query, pipeline.DatasetCommitted, timeout=290.0)
    return reply.version


@router.post("/{name}/urls", summary="presigned GETs for a version's manifest and packs")
async def download_urls(name: DatasetName, body: UrlsCreate, user: CurrentUser, gateway: GatewayDep) -> UrlsPublic:
    query = pipeline.DatasetUrlsQuery(
        name=name, owner=_reader(user), manifest=body.manifest, packs=body.packs, expires_s=body.expires_s
    )
    reply = await _call(gateway, pipeline.SYNCER_DATASET_URLS, query, pipeline.DatasetUrls)
    return UrlsPublic(version=reply.version, manifest_url=reply.manifest_url, urls=reply.urls)
