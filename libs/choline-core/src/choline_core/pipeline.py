"""Contracts of the run pipeline between the provisioner, the worker-agent and the syncer.

- ``AgentConfig``: what the provisioner writes to the box (``<box dir>/agent.json``, 0600)
  before starting ``python -m choline_agent run --config agent.json``. It holds URLs and
  run-scoped credentials only: never the user's provider key or S3 keys.
- Box → control plane requests (core NATS request/reply on ``Subjects.run_request(run,
  method)``, answered by the syncer in queue group ``syncer``): ``PresignRequest`` →
  ``PresignReply``; ``ResumeRequest`` → ``ResumeReply``. The syncer derives the run from the
  subject and computes every object key itself, so a box can only read and write its own run's
  objects (plus content-addressed code, env and data objects, read-only).

Object layout (one bucket per installation)::

    code/<sha256>.tar.gz                     content-addressed code bundles
    envs/<sha256>.json                       resolved dependency specs
    runs/<run>/attempts/<n>/checkpoints/<step>/<file>   manifest.json written last
    runs/<run>/artifacts/<path>              outputs brought back to the user
    runs/<run>/logs/attempt-<n>.txt          the attempt's full output (written at the end)
    data/packs/<sha256>                      dataset packfiles (see "datasets" below)
    data/<name>/manifest/<sha256>            dataset versions

Digests: a code bundle's digest is the sha256 of the ``.tar.gz`` bytes stored at ``code_key``; an
environment's digest is ``EnvSpec.digest()``, the sha256 of ``EnvSpec.to_bytes()`` (the bytes stored at
``env_key``). The agent checks both after downloading.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import Field

from .errors import BadSpec
from .events import DataMount, Event, Model

PRESIGN_METHOD = "presign"
RESUME_METHOD = "resume"

Purpose = Literal["checkpoint", "artifact", "code", "env", "logs", "dataset"]


def code_key(digest: str) -> str:
    return f"code/{digest}.tar.gz"


def env_key(digest: str) -> str:
    return f"envs/{digest}.json"


def checkpoint_prefix(run_id: str, attempt: int, step: int) -> str:
    return f"runs/{run_id}/attempts/{attempt}/checkpoints/{step}"


def artifact_prefix(run_id: str) -> str:
    return f"runs/{run_id}/artifacts"


def logs_key(run_id: str, attempt: int) -> str:
    return f"runs/{run_id}/logs/attempt-{attempt}.txt"


class AgentConfig(Model):
    """Everything the agent needs to run one attempt on one box."""

    run_id: str
    attempt: int
    box_id: str
    workdir: str  # the box's folder for this attempt: code/, run/, data/, agent.sock ...
    nats_url: str
    nats_creds: str | None = None  # path on the box to a .creds file (operator/JWT mode)
    nats_token: str | None = None
    subject_prefix: str = "choline"
    inbox_prefix: str | None = None
    script: str
    args: list[str] = Field(default_factory=list)
    code_digest: str | None = None
    env_digest: str | None = None
    env: dict[str, str] = Field(default_factory=dict)  # the user's --env values
    data: list[DataMount] = Field(default_factory=list)
    gpus: int = 0
    distributed: bool = False
    resume: bool = True  # restore the newest complete checkpoint of the run, if any
    heartbeat_s: float = 5.0
    python: str | None = None  # interpreter with the shared base environment; default: the agent's own
    artifacts_limit_mb: int = 512
    agent_min_version: str | None = None
    envs_dir: str | None = None  # the box's shared virtualenvs, reused across runs; default $CHOLINE_HOME/envs
    journal_limit_mb: int = 512  # the agent's on-disk outbox while NATS is unreachable (oldest dropped beyond)
    datasets_dir: str | None = None  # the box's materialised datasets, reused across runs; default $CHOLINE_HOME/data


class PresignRequest(Event):
    """A box asks for presigned URLs. ``files`` are names relative to the purpose's prefix."""

    TYPE: ClassVar[str] = "sync.presign_request"
    attempt: int
    purpose: Purpose
    method: Literal["GET", "PUT"] = "PUT"
    step: int | None = None  # for checkpoints
    digest: str | None = None  # for code and env; for a dataset, its manifest digest
    files: list[str] = Field(default_factory=list)  # for a dataset: pack digests (GET only)


class PresignReply(Event):
    TYPE: ClassVar[str] = "sync.presign_reply"
    prefix: str
    urls: dict[str, str]  # file name -> URL


class ResumeRequest(Event):
    TYPE: ClassVar[str] = "sync.resume_request"
    attempt: int


class ResumeFile(Model):
    path: str
    size: int
    sha256: str
    url: str


class ResumeReply(Event):
    """The newest complete checkpoint of the run (any attempt), or ``step=None`` when there is none,
    and the control commands earlier attempts applied (``control_ack`` records, by ``(step, tick)``):
    the library replays those its checkpoint does not include."""

    TYPE: ClassVar[str] = "sync.resume_reply"
    step: int | None = None
    attempt: int | None = None
    prefix: str | None = None
    files: list[ResumeFile] = Field(default_factory=list)
    controls: list[dict[str, Any]] = Field(default_factory=list)


class BoxEndpoints(Event):
    """Published by the provisioner (on the run's events) when an attempt's box is bootstrapped:
    the endpoints the box sees. The syncer presigns URLs for ``s3_endpoint`` (Signature V4 covers
    the Host header, so a URL signed for the box's tunnel port works through the tunnel)."""

    TYPE: ClassVar[str] = "box.endpoints"
    run_id: str
    attempt: int
    box_id: str
    nats_url: str
    s3_endpoint: str


# ------------------------------------------------------------------------------------ environments
class EnvSpec(Model):
    """``envs/<digest>.json``: the resolved dependency spec of a run, written by the CLI.

    The agent builds a virtualenv keyed by ``digest()`` under the box's shared envs folder, layered on
    the base interpreter's packages (an installed torch that satisfies ``requirements`` is reused, not
    downloaded), and reuses it for every later run with the same spec.
    """

    python: str | None = None  # "3.11": the version the user's machine ran (a warning when the box differs)
    requirements: list[str] = Field(default_factory=list)  # pip requirement strings: "numpy>=1.26"
    source: str = "requirements.txt"  # requirements.txt | pyproject | imports | flag
    pip_args: list[str] = Field(default_factory=list)  # extra pip install arguments ("--extra-index-url", URL)

    def to_bytes(self) -> bytes:
        """The canonical bytes (sorted keys, no spaces): what is stored and hashed."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()


class EnvironmentReady(Event):
    """Published by the agent on the run's events once the script's environment is built (or reused).

    ``torch`` is the version the run uses and ``torch_source`` where it comes from: ``base`` (the box's
    interpreter, e.g. a GPU image's torch), ``env`` (installed into the run's virtualenv) or ``none``.
    """

    TYPE: ClassVar[str] = "attempt.environment"
    run_id: str
    attempt: int
    box_id: str | None = None
    env_digest: str | None = None
    python: str
    torch: str | None = None
    torch_source: str = "none"
    reused: bool = False
    seconds: float = 0.0


# ------------------------------------------------------------------------------------ syncer RPC
# Core NATS request/reply on ``Subjects.rpc("syncer", method)``, queue group ``syncer``, for the
# gateway and the CLI (never for boxes). Errors come back as ``error`` envelopes (``rpc.raise_for_error``).
SYNCER_UPLOAD = "upload"
SYNCER_CHECKPOINTS = "checkpoints"
SYNCER_ARTIFACTS = "artifacts"


class UploadQuery(Event):
    """``upload``: where to put a code bundle or an env spec. Content-addressed: when the object is already
    stored the reply has ``exists=True`` and no URL, so an unchanged tree uploads nothing."""

    TYPE: ClassVar[str] = "sync.upload_query"
    kind: Literal["code", "env"]
    digest: str  # sha256 hex of the bytes to upload


class UploadReply(Event):
    TYPE: ClassVar[str] = "sync.upload_reply"
    key: str
    exists: bool
    url: str | None = None  # presigned PUT (for the control plane's S3 endpoint), when not ``exists``


class CheckpointsQuery(Event):
    TYPE: ClassVar[str] = "sync.checkpoints_query"
    run_id: str
    include_deleted: bool = False


class CheckpointInfo(Model):
    run_id: str
    attempt: int
    step: int
    prefix: str
    reason: str = "periodic"
    size: int = 0
    files: int = 0
    metrics: dict[str, float | None] = Field(default_factory=dict)
    created_at: datetime | None = None
    deleted_at: datetime | None = None  # retention removed it from object storage


class CheckpointList(Event):
    TYPE: ClassVar[str] = "sync.checkpoint_list"
    run_id: str
    checkpoints: list[CheckpointInfo]  # by step, then attempt


class ArtifactsQuery(Event):
    TYPE: ClassVar[str] = "sync.artifacts_query"
    run_id: str
    presign: bool = True  # add presigned GETs (valid for ``expires_s``)
    expires_s: int = 3600


class ArtifactInfo(Model):
    path: str  # relative to the run's artifacts prefix
    key: str
    size: int
    sha256: str
    attempt: int
    url: str | None = None


class LogInfo(Model):
    attempt: int
    key: str
    size: int
    url: str | None = None


class ArtifactList(Event):
    TYPE: ClassVar[str] = "sync.artifact_list"
    run_id: str
    artifacts: list[ArtifactInfo]
    bundle: str | None = None  # the artifact path of the model bundle tarball, when the run made one
    logs: list[LogInfo] = Field(default_factory=list)


# ------------------------------------------------------------------------------------ datasets
# A dataset version is a manifest: every file's content-defined chunks, each located in a packfile.
#
#   data/packs/<sha256>                ~16 MiB packfiles: chunk bytes back to back, then a JSON index of
#                                      the chunks (sha256, offset, length), then a 16-byte footer
#                                      (``PACK_MAGIC`` + the index's length, 8 bytes big-endian). The key is
#                                      the sha256 of the index (which names each chunk by its sha256).
#   data/<name>/manifest/<sha256>      the manifest, gzip-compressed canonical JSON; the key's digest is the
#                                      sha256 of the *uncompressed* canonical JSON (``DatasetManifest.digest``)
#
# Versions share chunks, and only chunks the object store does not hold yet move. The syncer indexes a
# pack's chunks only after reading the pack back and checking every hash, so a manifest can only point at
# verified bytes; readers check each chunk's sha256 again as it arrives.
DATASET_FORMAT = "choline-dataset/1"
PACK_MAGIC = b"CHOLPAK1"
PACK_FOOTER = len(PACK_MAGIC) + 8
PACK_TARGET = 16 * 1024 * 1024
MAX_DATASET_BATCH = 2048  # chunk hashes or pack digests per request (NATS carries at most 1 MiB)

_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


def pack_key(digest: str) -> str:
    return f"data/packs/{digest}"


def manifest_key(name: str, digest: str) -> str:
    return f"data/{name}/manifest/{digest}"


def check_dataset_name(name: str) -> str:
    """A dataset name is one path component: letters, digits, ``_ . -``, starting with a letter or digit."""
    if not isinstance(name, str) or not _DATASET_NAME.match(name) or name == "packs":
        raise BadSpec(
            f"bad dataset name {name!r}",
            hint="use letters, digits, '_', '.' and '-' (up to 100 characters, not 'packs'), e.g. imagenet-mini",
        )
    return name


def check_sha(value: str, what: str = "digest") -> str:
    if not isinstance(value, str) or not _SHA.match(value):
        raise BadSpec(f"{what} must be a sha256 digest (64 lowercase hex characters), not {str(value)[:80]!r}")
    return value


def check_member_path(path: str) -> str:
    """A path inside a dataset: relative, ``/``-separated, without empty, ``.`` or ``..`` parts."""
    if (
        not isinstance(path, str)
        or not path
        or len(path) > 4096
        or path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or (len(path) > 1 and path[1] == ":")
        or any(part in ("", ".", "..") or len(part.encode()) > 255 for part in path.split("/"))
    ):
        raise BadSpec(f"unsafe path in dataset: {str(path)[:200]!r} (absolute, empty, '.' or '..' parts)")
    return path


def link_stays_inside(path: str, target: str) -> bool:
    """Whether a symlink at ``path`` pointing to ``target`` (relative) resolves inside the dataset."""
    if not target or target.startswith("/") or "\\" in target or "\x00" in target:
        return False
    parts: list[str] = path.split("/")[:-1]
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return False
            parts.pop()
        else:
            parts.append(part)
    return True


class ManifestFile(Model):
    """A regular file: ``chunks`` are ``[pack index, offset in the pack, length, sha256]`` in file order."""

    path: str
    size: int = Field(ge=0)
    mode: int = 0o644
    chunks: list[tuple[int, int, int, str]] = Field(default_factory=list)


class ManifestLink(Model):
    path: str
    target: str  # relative to the link's folder, never leaving the dataset


class DatasetManifest(Model):
    """One version of a dataset. Content-addressed: the same tree gives the same digest (no names, no times)."""

    format: str = DATASET_FORMAT
    packs: list[str] = Field(default_factory=list)
    files: list[ManifestFile] = Field(default_factory=list)
    links: list[ManifestLink] = Field(default_factory=list)
    dirs: list[str] = Field(default_factory=list)  # empty folders

    def canonical(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    def to_bytes(self) -> bytes:
        """What is stored: the canonical JSON, gzip-compressed (no timestamp in the header)."""
        return gzip.compress(self.canonical(), compresslevel=6, mtime=0)

    @classmethod
    def from_bytes(cls, raw: bytes, digest: str | None = None) -> DatasetManifest:
        """Parse stored bytes, check the digest when given, and ``validate()``; ``BadSpec`` when anything is off."""
        try:
            text = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        except (OSError, EOFError) as exc:
            raise BadSpec(f"the dataset manifest is not readable: {exc}") from None
        if digest is not None and hashlib.sha256(text).hexdigest() != digest:
            raise BadSpec(f"the dataset manifest does not match its digest {digest[:12]}")
        try:
            manifest = cls.model_validate(json.loads(text), context={"lenient": True})
        except ValueError as exc:
            raise BadSpec(f"the dataset manifest is not valid: {str(exc)[:300]}") from None
        manifest.validate_tree()
        return manifest

    def validate_tree(self) -> None:
        """Refuse what could write outside the dataset or read bytes that do not exist: unsafe paths, two
        entries at one path, an entry below a file or a link, links leaving the dataset, bad chunk refs."""
        if self.format != DATASET_FORMAT:
            raise BadSpec(f"unknown dataset manifest format {self.format!r} (this choline reads {DATASET_FORMAT})")
        for p in self.packs:
            check_sha(p, "a pack digest")
        seen: dict[str, str] = {}
        for kind, paths in (
            ("file", [f.path for f in self.files]),
            ("link", [link.path for link in self.links]),
            ("dir", list(self.dirs)),
        ):
            for path in paths:
                check_member_path(path)
                if path in seen:
                    raise BadSpec(f"two entries at {path!r} in the dataset manifest")
                seen[path] = kind
        for path in seen:
            parts = path.split("/")
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i])
                if seen.get(parent) in ("file", "link"):
                    raise BadSpec(f"{path!r} lies below the {seen[parent]} {parent!r} in the dataset manifest")
        for link in self.links:
            if not link_stays_inside(link.path, link.target):
                raise BadSpec(f"the link {link.path!r} points outside the dataset ({link.target!r})")
        npacks = len(self.packs)
        for f in self.files:
            total = 0
            for pack, offset, length, sha in f.chunks:
                if not (0 <= pack < npacks) or offset < 0 or length <= 0:
                    raise BadSpec(f"{f.path!r} has a chunk outside the dataset's packs")
                check_sha(sha, "a chunk digest")
                total += length
            if total != f.size:
                raise BadSpec(f"{f.path!r}: its chunks hold {total} bytes, its size is {f.size}")
            if not 0 <= f.mode <= 0o7777:
                raise BadSpec(f"{f.path!r}: bad mode {f.mode!r}")

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def chunk_count(self) -> int:
        return len({c[3] for f in self.files for c in f.chunks})


def pack_footer(index_length: int) -> bytes:
    return PACK_MAGIC + index_length.to_bytes(8, "big")


def parse_pack_footer(footer: bytes) -> int:
    """The index length a pack's last ``PACK_FOOTER`` bytes announce; ``BadSpec`` if they are not a footer."""
    if len(footer) != PACK_FOOTER or footer[: len(PACK_MAGIC)] != PACK_MAGIC:
        raise BadSpec("not a choline packfile (no footer)")
    return int.from_bytes(footer[len(PACK_MAGIC) :], "big")


def parse_pack_index(raw: bytes, body_size: int) -> list[tuple[str, int, int]]:
    """A pack's index ``[[sha256, offset, length], ...]``, checked to lie inside the pack's body."""
    try:
        entries = json.loads(raw)["chunks"]
        out = [(check_sha(str(s), "a chunk digest"), int(o), int(n)) for s, o, n in entries]
    except (ValueError, KeyError, TypeError) as exc:
        raise BadSpec(f"unreadable pack index: {exc}") from None
    for _, offset, length in out:
        if offset < 0 or length <= 0 or offset + length > body_size:
            raise BadSpec("a pack index entry points outside the pack")
    return out


# The gateway's dataset calls to the syncer (``Subjects.rpc("syncer", method)``). ``owner`` is the gateway's
# authenticated user; ``None`` (an admin) sees every owner's datasets.
SYNCER_DATASET_CHUNKS = "dataset_chunks"
SYNCER_DATASET_UPLOAD = "dataset_upload"
SYNCER_DATASET_REGISTER = "dataset_register"
SYNCER_DATASET_COMMIT = "dataset_commit"
SYNCER_DATASETS = "datasets"
SYNCER_DATASET_URLS = "dataset_urls"


class DatasetChunksQuery(Event):
    """``dataset_chunks``: which of these chunks are stored, and where."""

    TYPE: ClassVar[str] = "sync.dataset_chunks_query"
    chunks: list[str] = Field(max_length=MAX_DATASET_BATCH)


class DatasetChunksReply(Event):
    TYPE: ClassVar[str] = "sync.dataset_chunks_reply"
    packs: list[str] = Field(default_factory=list)
    found: dict[str, tuple[int, int, int]] = Field(default_factory=dict)  # sha -> [index in packs, offset, length]


class DatasetUploadQuery(Event):
    """``dataset_upload``: presigned PUTs for packs (by digest) or a manifest (``name`` and its digest)."""

    TYPE: ClassVar[str] = "sync.dataset_upload_query"
    kind: Literal["pack", "manifest"]
    name: str | None = None
    digests: list[str] = Field(max_length=MAX_DATASET_BATCH)


class DatasetUploadItem(Model):
    digest: str
    key: str
    exists: bool
    url: str | None = None


class DatasetUploadReply(Event):
    TYPE: ClassVar[str] = "sync.dataset_upload_reply"
    items: list[DatasetUploadItem]


class DatasetRegister(Event):
    """``dataset_register``: index uploaded packs. The syncer reads each back, checks its digest and every
    chunk's, and only then records the chunks; a pack that fails is deleted and named in ``bad``."""

    TYPE: ClassVar[str] = "sync.dataset_register"
    packs: list[str] = Field(max_length=64)


class DatasetRegistered(Event):
    TYPE: ClassVar[str] = "sync.dataset_registered"
    packs: list[str] = Field(default_factory=list)  # indexed (now or before)
    missing: list[str] = Field(default_factory=list)  # not in object storage
    bad: list[str] = Field(default_factory=list)  # failed verification, deleted
    chunks: int = 0  # chunks newly indexed


class DatasetCommit(Event):
    """``dataset_commit``: record ``manifest`` (already stored at ``manifest_key``) as the newest version of
    ``name``. The syncer checks the manifest, that every chunk it names is indexed at that place, and that
    every pack is still in object storage."""

    TYPE: ClassVar[str] = "sync.dataset_commit"
    name: str
    manifest: str
    owner: str = "admin"
    source: str | None = None  # where it was pushed from (informational)


class DatasetVersionInfo(Model):
    name: str
    owner: str
    manifest: str
    size: int
    files: int
    chunks: int
    packs: int
    created_at: datetime | None = None
    source: str | None = None


class DatasetInfo(Model):
    name: str
    owner: str
    latest: DatasetVersionInfo
    versions: list[DatasetVersionInfo] = Field(default_factory=list)  # newest first (only for one dataset)


class DatasetCommitted(Event):
    TYPE: ClassVar[str] = "sync.dataset_committed"
    version: DatasetVersionInfo


class DatasetsQuery(Event):
    """``datasets``: the caller's datasets (``name``: one, with every version)."""

    TYPE: ClassVar[str] = "sync.datasets_query"
    owner: str | None = None
    name: str | None = None


class DatasetList(Event):
    TYPE: ClassVar[str] = "sync.dataset_list"
    datasets: list[DatasetInfo]


class DatasetUrlsQuery(Event):
    """``dataset_urls``: presigned GETs for a version's manifest and the packs asked for (each must belong to
    the version). ``manifest`` may be a unique prefix of the digest, or empty for the newest version."""

    TYPE: ClassVar[str] = "sync.dataset_urls_query"
    name: str
    owner: str | None = None
    manifest: str | None = None
    packs: list[str] = Field(default_factory=list, max_length=MAX_DATASET_BATCH)
    expires_s: int = 4 * 3600


class DatasetUrls(Event):
    TYPE: ClassVar[str] = "sync.dataset_urls"
    version: DatasetVersionInfo
    manifest_url: str
    urls: dict[str, str] = Field(default_factory=dict)  # pack digest -> presigned GET
