"""Contracts for models (owned by the syncer) and deployments (owned by the deploy service).

Core NATS request/reply on ``Subjects.rpc(service, method)``; errors come back as the shared error body
(``rpc.raise_for_error``).

Syncer (owns model versions: ``syncer_models``; bundles under ``models/<owner>/<name>/<version>/``):
    ``models``          ModelsQuery(owner?, name?)               -> ModelList (newest version first)
    ``model_get``       ModelGet(name, version?, owner?, presign) -> ModelVersionInfo (+ a download URL)
    ``model_upload``    ModelUploadQuery(sha256, size)           -> ModelUpload (a presigned PUT, or that it is stored)
    ``model_register``  ModelRegister(key, owner, ...)           -> ModelVersionInfo (reads the card from the tarball)

    A run that ends ``succeeded`` with a bundle among its artifacts is registered by the syncer itself.

Deploy service (owns deployments: ``deploy_deployments``, ``deploy_replicas``):
    ``deploy``       DeployRequest     -> DeploymentInfo (state ``deploying``; ``ready`` once every replica answers)
    ``deployments``  DeploymentsQuery  -> DeploymentList
    ``undeploy``     UndeployRequest   -> DeploymentInfo (state ``removed``: every process stopped, every box released)
    ``rollback``     RollbackRequest   -> DeploymentInfo (the previous version, started before the current one stops)
    ``route``        RouteQuery        -> Route (where the gateway forwards ``/v1/deployments/NAME/predict``)

Events: ``DeploymentChanged`` (``choline_core.events``) on ``Subjects.deploy("changed")`` at every state change,
with ``owner``; the gateway turns ``ready`` into ``deployment.ready`` webhooks.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, ClassVar

from pydantic import Field

from .events import Event, Model

SYNCER = "syncer"
DEPLOY = "deploy"

# syncer methods
MODELS = "models"
MODEL_GET = "model_get"
MODEL_UPLOAD = "model_upload"
MODEL_REGISTER = "model_register"

# deploy methods
DEPLOY_CREATE = "deploy"
DEPLOYMENTS = "deployments"
UNDEPLOY = "undeploy"
ROLLBACK = "rollback"
ROUTE = "route"

# the subject action of DeploymentChanged events: Subjects.deploy(CHANGED)
CHANGED = "changed"

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
BUNDLE_SUFFIX = ".choline-bundle.tar.gz"


def model_prefix(owner: str, name: str, version: int) -> str:
    return f"models/{owner}/{name}/{version}"


def model_key(owner: str, name: str, version: int) -> str:
    return f"{model_prefix(owner, name, version)}/{name}{BUNDLE_SUFFIX}"


def upload_key(sha256: str) -> str:
    """Where ``choline models push`` uploads a bundle before it is registered (content-addressed)."""
    return f"models/_uploads/{sha256}{BUNDLE_SUFFIX}"


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``digits`` -> ("digits", None); ``digits:3`` -> ("digits", 3). Raises ``ValueError``."""
    name, _, version = ref.partition(":")
    if not NAME_RE.match(name):
        raise ValueError(f"{name!r} is not a model name (letters, digits, '_', '.', '-'; 100 at most)")
    if not version:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise ValueError(f"{version!r} is not a model version (1, 2, 3 ...)")
    return name, int(version)


# ===================================================================================== models
class ModelVersionInfo(Event):
    TYPE: ClassVar[str] = "rpc.model_version"
    name: str
    version: int
    owner: str
    key: str
    size: int
    sha256: str
    run_id: str | None = None
    source: str | None = None  # "run" or "push"
    created_at: datetime
    card: dict[str, Any] = Field(default_factory=dict)
    url: str | None = None  # a presigned GET, when asked for


class ModelsQuery(Event):
    TYPE: ClassVar[str] = "rpc.models_query"
    owner: str | None = None  # None = every owner (admin)
    name: str | None = None
    cards: bool = False  # include each version's card


class ModelList(Event):
    TYPE: ClassVar[str] = "rpc.model_list"
    models: list[ModelVersionInfo]


class ModelGet(Event):
    TYPE: ClassVar[str] = "rpc.model_get"
    name: str
    version: int | None = None  # None = the newest
    owner: str | None = None
    presign: bool = False
    expires_s: int = 3600


class ModelUploadQuery(Event):
    TYPE: ClassVar[str] = "rpc.model_upload_query"
    sha256: str
    size: int


class ModelUpload(Event):
    TYPE: ClassVar[str] = "rpc.model_upload"
    key: str
    exists: bool
    url: str | None = None


class ModelRegister(Event):
    TYPE: ClassVar[str] = "rpc.model_register"
    key: str  # an uploaded tarball (``upload_key``) or a run's artifact
    owner: str
    sha256: str | None = None  # checked against the object when given
    run_id: str | None = None
    source: str = "push"
    name: str | None = None  # default: the card's name


# ===================================================================================== deployments
class DeployConfig(Model):
    replicas: int = Field(default=1, ge=1, le=16)
    max_batch: int = Field(default=32, ge=1, le=4096)
    max_wait_ms: float = Field(default=2.0, ge=0, le=10_000)
    timeout_s: float = Field(default=30.0, gt=0, le=3600)
    gpus: str | None = None  # None: local processes
    provider: str = "local"


class ReplicaInfo(Model):
    replica_id: str
    version: int
    state: str  # starting | ready | draining | failed | stopped
    url: str | None = None
    pid: int | None = None
    box_id: str | None = None
    run_id: str | None = None  # on a rented box: the run whose script is this serving process
    restarts: int = 0
    error: str | None = None


class DeploymentInfo(Event):
    TYPE: ClassVar[str] = "rpc.deployment"
    name: str
    owner: str
    model: str
    version: int
    previous_version: int | None = None
    state: str  # deploying | ready | degraded | failed | removed
    reason: str | None = None
    config: DeployConfig = Field(default_factory=DeployConfig)
    replicas: list[ReplicaInfo] = Field(default_factory=list)
    created_at: datetime
    updated_at: datetime


class DeployRequest(Event):
    TYPE: ClassVar[str] = "rpc.deploy_request"
    model: str
    version: int | None = None  # None = the newest
    owner: str
    name: str | None = None  # the deployment's name (default: the model's)
    config: DeployConfig = Field(default_factory=DeployConfig)


class DeploymentsQuery(Event):
    TYPE: ClassVar[str] = "rpc.deployments_query"
    owner: str | None = None
    name: str | None = None


class DeploymentList(Event):
    TYPE: ClassVar[str] = "rpc.deployment_list"
    deployments: list[DeploymentInfo]


class UndeployRequest(Event):
    TYPE: ClassVar[str] = "rpc.undeploy_request"
    name: str
    owner: str | None = None  # None: an admin's, any owner


class RollbackRequest(Event):
    TYPE: ClassVar[str] = "rpc.rollback_request"
    name: str
    owner: str | None = None


class RouteQuery(Event):
    TYPE: ClassVar[str] = "rpc.route_query"
    name: str
    owner: str | None = None


class Route(Event):
    TYPE: ClassVar[str] = "rpc.route"
    name: str
    version: int
    urls: list[str]  # the ready replicas' base URLs
    tokens: list[str] = Field(default_factory=list)  # per URL: a bearer token ("" for none), for box replicas
