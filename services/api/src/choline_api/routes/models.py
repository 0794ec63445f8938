"""``/v1/models``: model versions (owned by the syncer): list, show a card, and the two calls ``choline models
push`` makes (a presigned PUT for the tarball, then registering it). A run that succeeds with a bundle is
registered by the syncer itself."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, status
from pydantic import BaseModel, ConfigDict
from pydantic import Field as PField

from choline_core import deploy as c
from choline_core.errors import NotFound

from ..deps import CurrentUser, GatewayDep
from ..store import Principal

router = APIRouter(prefix="/models", tags=["models"])

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$"
ModelName = Annotated[str, Path(pattern=NAME, description="the model's name (its card's name)")]


class ModelPage(BaseModel):
    models: list[c.ModelVersionInfo]


class ModelUploadCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str = PField(pattern=r"^[0-9a-f]{64}$", description="sha256 of the .choline-bundle.tar.gz")
    size: int = PField(gt=0, description="its size in bytes")


class ModelCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str = PField(max_length=1200, description="the key model_upload answered")
    sha256: str = PField(pattern=r"^[0-9a-f]{64}$")
    name: str | None = PField(default=None, pattern=NAME, description="default: the card's name")


def _reader(user: Principal) -> str | None:
    return None if user.admin else user.user


@router.get("", summary="your models: every version, newest first (cards with ?cards=true)")
async def list_models(
    user: CurrentUser, gateway: GatewayDep, cards: Annotated[bool, Query(description="include the cards")] = False
) -> ModelPage:
    found = await gateway.call(c.SYNCER, c.MODELS, c.ModelsQuery(owner=_reader(user), cards=cards), c.ModelList)
    return ModelPage(models=found.models)


@router.get("/{name}", summary="one model version with its card (default: the newest)")
async def get_model(
    name: ModelName,
    user: CurrentUser,
    gateway: GatewayDep,
    version: Annotated[int | None, Query(ge=1, description="default: the newest")] = None,
    download: Annotated[bool, Query(description="include a presigned download URL")] = False,
) -> c.ModelVersionInfo:
    q = c.ModelGet(name=name, version=version, owner=_reader(user), presign=download)
    return await gateway.call(c.SYNCER, c.MODEL_GET, q, c.ModelVersionInfo)


@router.get("/{name}/versions", summary="every version of one model, newest first")
async def list_versions(name: ModelName, user: CurrentUser, gateway: GatewayDep) -> ModelPage:
    found = await gateway.call(c.SYNCER, c.MODELS, c.ModelsQuery(owner=_reader(user), name=name), c.ModelList)
    if not found.models:
        raise NotFound(f"no model {name!r}", hint="'choline models ls' lists yours")
    return ModelPage(models=found.models)


@router.post("/uploads", summary="where to PUT a bundle tarball (or that it is stored already)")
async def upload_model(body: ModelUploadCreate, user: CurrentUser, gateway: GatewayDep) -> c.ModelUpload:
    q = c.ModelUploadQuery(sha256=body.sha256, size=body.size)
    return await gateway.call(c.SYNCER, c.MODEL_UPLOAD, q, c.ModelUpload)


@router.post("", status_code=status.HTTP_201_CREATED, summary="register an uploaded bundle as a new version")
async def register_model(body: ModelCreate, user: CurrentUser, gateway: GatewayDep) -> c.ModelVersionInfo:
    if not body.key.startswith("models/_uploads/"):
        raise NotFound("no such upload", hint="POST /v1/models/uploads first")
    q = c.ModelRegister(key=body.key, owner=user.user, sha256=body.sha256, name=body.name, source="push")
    return await gateway.call(c.SYNCER, c.MODEL_REGISTER, q, c.ModelVersionInfo)
