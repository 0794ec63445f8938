"""The contract between the training library (``import choline`` in the user's script) and the worker-agent.

The agent starts the user's script with the environment variables below set. Without them (a laptop) the
library writes to a local run folder and talks to nobody. With ``CHOLINE_AGENT_SOCKET`` set, global rank 0
of the script connects to that Unix socket and both sides exchange **newline-delimited JSON**: one object per
line, UTF-8, each with a ``"type"`` field naming the message. Nothing here imports torch; it runs on
Python 3.10.

Library → agent
    ``hello``       first message on every (re)connection: pid, rank, world size, versions
    ``metrics``     points logged by ``run.log``; each carries the library's global step and the attempt
    ``checkpoint``  a checkpoint directory is complete (its ``manifest.json`` is written, last); upload it
    ``status``      phase changes (``training``, ``validating``, ``finished`` ...) and a periodic step
    ``artifact``    a file or folder the script wants brought back with the run's outputs
    ``control_ack`` a control command was applied at a step (with its poll ``tick`` and its effect), or
                    refused (``message`` says why); a replayed command is acknowledged again (``replay``)

Agent → library
    ``uploaded``    the checkpoint of this step is in object storage, manifest last; only now may the
                    library delete its local copy
    ``control``     a user's command (pause, resume, stop, set ...); the library queues it between steps

Rules both sides keep
    * Readers are lenient: unknown message types are ignored, unknown fields dropped. Writers are strict.
    * A ``checkpoint`` message may repeat (the library re-announces every local checkpoint not yet confirmed
      after a reconnection): the agent de-duplicates by ``step``. A checkpoint directory the library listed
      may vanish before upload only when more than ``max_local`` unconfirmed checkpoints pile up (disk
      bound, oldest first); the agent skips such a directory.
    * Metric points are unique on ``(attempt, seq)``; ``seq`` restarts at 0 with each attempt (each process
      start). Non-finite values travel as ``value: null`` with ``raw`` = ``"nan"`` | ``"inf"`` | ``"-inf"``.
    * Unix socket paths must be shorter than 108 bytes (the kernel's limit).

A checkpoint directory holds the files its ``manifest.json`` lists (``path``, ``size``, ``sha256``) and the
manifest itself, which is always written last (temporary name, fsync, rename). A directory without a
manifest, or whose files do not match it, is incomplete. The agent uploads the listed files first and the
manifest last, to ``runs/<run>/attempts/<n>/checkpoints/<step>/``; to resume it downloads the newest complete
one into a local folder and names it in ``CHOLINE_RESUME_FROM``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from .events import Model

PROTOCOL_VERSION = 1

# ------------------------------------------------------------------------------------ environment
ENV_RUN_ID = "CHOLINE_RUN_ID"
"""The run's id (the control plane's). Locally the library makes one up."""
ENV_ATTEMPT = "CHOLINE_ATTEMPT"
"""This attempt's number (int, 1-based). Every metric point carries it."""
ENV_AGENT_SOCKET = "CHOLINE_AGENT_SOCKET"
"""Path of the agent's Unix socket. Unset: no agent, local run folder only."""
ENV_RUN_DIR = "CHOLINE_RUN_DIR"
"""The local run folder: ``metrics.jsonl``, ``run.json``, ``checkpoints/<step>/``. Default ``./choline-runs/<id>``."""
ENV_RESUME_FROM = "CHOLINE_RESUME_FROM"
"""A local directory holding the checkpoint the agent restored from object storage. When set, the library
resumes from exactly that one (and fails loudly if it is not a complete checkpoint)."""
ENV_DATA_DIR = "CHOLINE_DATA_DIR"
"""Where the run's datasets were placed (read-only for the script): dataset ``name`` is the folder
``$CHOLINE_DATA_DIR/<dataset_dirname(name)>``."""
ENV_CONTROL_LOG = "CHOLINE_CONTROL_LOG"
"""Optional: a file of control records applied by earlier attempts (JSON lines or a JSON list; each one a
``control_ack`` the library sent: ``id, action, params, ok, step, tick``). The library replays the ``set``
commands the checkpoint it resumes from does not include, at the same ``(step, tick)``."""

ENV_VARS = (ENV_RUN_ID, ENV_ATTEMPT, ENV_AGENT_SOCKET, ENV_RUN_DIR, ENV_RESUME_FROM, ENV_DATA_DIR, ENV_CONTROL_LOG)


def dataset_dirname(name: str) -> str:
    """The folder name dataset ``name`` gets under ``$CHOLINE_DATA_DIR`` (no separators, no ``..``)."""
    return name.replace("/", "_").replace("..", "_") or "data"


# ------------------------------------------------------------------------------------ exit codes
EXIT_PAUSED = 75
"""The script's exit code after a pause: its pause checkpoint is written and announced, and it stopped on
purpose. The agent ends the attempt with reason ``paused`` (75 is ``EX_TEMPFAIL``: try again later)."""

# ------------------------------------------------------------------------------------ checkpoint folder
MANIFEST = "manifest.json"
CHECKPOINT_FORMAT = "choline-checkpoint/1"
CheckpointReason = Literal["periodic", "epoch", "pause", "final"]
CHECKPOINT_REASONS: tuple[str, ...] = ("periodic", "epoch", "pause", "final")

Phase = Literal[
    "starting", "restored", "training", "validating", "checkpointing", "finished", "failed", "paused", "cancelled"
]


class ManifestFile(Model):
    path: str  # relative to the checkpoint directory, '/'-separated
    size: int
    sha256: str


class CheckpointManifest(Model):
    """``manifest.json``: what a complete checkpoint directory holds. Written last."""

    format: str = CHECKPOINT_FORMAT
    run_id: str | None = None
    attempt: int | None = None
    step: int
    epoch: int | None = None
    reason: str = "periodic"
    created: float  # unix seconds
    library_version: str | None = None
    files: list[ManifestFile]
    metrics: dict[str, float | None] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)  # library-private (threads, world size, ...)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


class IncompleteCheckpoint(ValueError):
    """A checkpoint directory without a manifest, or whose files do not match it."""


def read_manifest(directory: str | os.PathLike[str]) -> CheckpointManifest:
    """The manifest of a checkpoint directory (lenient); ``IncompleteCheckpoint`` when absent or unreadable."""
    path = Path(directory) / MANIFEST
    try:
        raw = json.loads(path.read_text())
        return CheckpointManifest.model_validate(raw, context={"lenient": True})
    except FileNotFoundError:
        raise IncompleteCheckpoint(f"{directory}: no {MANIFEST} (the checkpoint was never completed)") from None
    except (OSError, ValueError) as exc:
        raise IncompleteCheckpoint(f"{directory}: unreadable {MANIFEST}: {exc}") from None


def verify_checkpoint(directory: str | os.PathLike[str], *, hashes: bool = True) -> CheckpointManifest:
    """Check every file the manifest lists: present, same size and (with ``hashes``) same sha256.

    Raises ``IncompleteCheckpoint`` naming the first mismatch.
    """
    manifest = read_manifest(directory)
    root = Path(directory)
    for f in manifest.files:
        p = root / f.path
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            raise IncompleteCheckpoint(f"{directory}: {f.path} is missing") from None
        if size != f.size:
            raise IncompleteCheckpoint(f"{directory}: {f.path} has {size} bytes, the manifest says {f.size}")
        if hashes and sha256_file(p) != f.sha256:
            raise IncompleteCheckpoint(f"{directory}: {f.path} does not match its sha256 (corrupt)")
    return manifest


# ------------------------------------------------------------------------------------ non-finite values
def encode_value(value: float) -> tuple[float | None, str | None]:
    """``(value, raw)`` for the wire: finite floats as they are; NaN and infinities as ``(None, "nan"|...)``."""
    if math.isfinite(value):
        return value, None
    if math.isnan(value):
        return None, "nan"
    return None, "inf" if value > 0 else "-inf"


def decode_value(value: float | None, raw: str | None) -> float:
    if value is not None:
        return float(value)
    if raw in ("nan", "inf", "-inf"):
        return float(raw)
    return math.nan


# ------------------------------------------------------------------------------------ messages
_MESSAGES: dict[str, type[Message]] = {}


class Message(Model):
    """One line on the socket. Subclasses set ``TYPE``; the wire form is ``{"type": TYPE, **fields}``."""

    TYPE: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TYPE:
            _MESSAGES[cls.TYPE] = cls

    def to_line(self) -> bytes:
        return encode(self)


# --- library -> agent
class Hello(Message):
    TYPE: ClassVar[str] = "hello"
    pid: int
    rank: int = 0
    world_size: int = 1
    library_version: str
    protocol: int = PROTOCOL_VERSION
    run_id: str | None = None
    attempt: int | None = None


class MetricPoint(Model):
    seq: int  # per attempt, from 0; (attempt, seq) is unique
    step: int  # the library's global step, whatever step the user passed
    key: str
    value: float | None  # None when not finite: see ``raw``
    raw: str | None = None  # "nan" | "inf" | "-inf"
    epoch: int | None = None
    ts: float  # unix seconds
    attempt: int | None = None
    user_step: int | None = None  # the step= the user passed to run.log, if any

    def as_float(self) -> float:
        return decode_value(self.value, self.raw)


class Metrics(Message):
    TYPE: ClassVar[str] = "metrics"
    points: list[MetricPoint]


class CheckpointReady(Message):
    """Sent only after ``dir/manifest.json`` is written. ``dir`` is absolute."""

    TYPE: ClassVar[str] = "checkpoint"
    step: int
    dir: str
    reason: str = "periodic"  # periodic | epoch | pause | final
    epoch: int | None = None
    metrics: dict[str, float | None] = Field(default_factory=dict)  # latest values; non-finite as None


class Status(Message):
    TYPE: ClassVar[str] = "status"
    phase: str  # starting | restored | training | validating | checkpointing | finished | failed
    step: int
    epoch: int | None = None
    detail: str | None = None


class Artifact(Message):
    TYPE: ClassVar[str] = "artifact"
    path: str  # absolute; a file or a folder
    name: str | None = None


class ControlAck(Message):
    """The library applied control ``id`` at ``step`` (``ok``) or refused it (``message`` says why).

    ``tick`` is the poll point within the step (a step can have several); ``(step, tick)`` is where a resumed
    run replays the command. ``effect`` is what changed (``{"lr": {"0": 3e-4}}``, ``{"epochs": 15}``).
    """

    TYPE: ClassVar[str] = "control_ack"
    id: str
    ok: bool
    step: int
    message: str | None = None
    action: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    tick: int | None = None
    epoch: int | None = None
    effect: dict[str, Any] = Field(default_factory=dict)
    replay: bool = False


# --- agent -> library
class Uploaded(Message):
    TYPE: ClassVar[str] = "uploaded"
    step: int


class Control(Message):
    """A user's command: ``action`` is pause | resume | stop | set | cancel; ``params`` for set: ``{"lr": 3e-4}``."""

    TYPE: ClassVar[str] = "control"
    id: str
    action: str
    params: dict[str, Any] = Field(default_factory=dict)


def encode(msg: Message) -> bytes:
    """One wire line (ends with ``\\n``). Refuses NaN/inf anywhere: encode them with ``encode_value``."""
    body = {"type": msg.TYPE, **msg.model_dump(mode="json")}
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def decode(line: bytes | str) -> Message | None:
    """Parse one line leniently. Unknown types give ``None``; malformed JSON raises ``ValueError``."""
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError("a protocol line must be a JSON object")
    cls = _MESSAGES.get(str(data.get("type")))
    if cls is None:
        return None
    body = {k: v for k, v in data.items() if k != "type"}
    return cls.model_validate(body, context={"lenient": True})


def message_types() -> dict[str, type[Message]]:
    return dict(_MESSAGES)
