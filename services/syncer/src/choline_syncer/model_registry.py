"""Model versions: the syncer owns them (``syncer_model``, migration ``syncer_0005``).

A version is a bundle tarball copied to ``models/<owner>/<name>/<version>/<name>.choline-bundle.tar.gz`` with
its card read out of the tarball (no torch, no unpacking: the card is one small member). Versions of
(owner, name) count 1, 2, 3 ...; registering the same bytes again (same sha256) returns the version it
already is, so a redelivered event or a repeated push adds nothing.

Where versions come from:
- a run that ends ``succeeded`` with a bundle among its artifacts (``runs/<run>/artifacts/*.choline-bundle.tar.gz``):
  the ``syncer-models`` consumer of run events registers it under the run's owner (asked of the provisioner);
- ``choline models push PATH``: the CLI uploads the tarball to a presigned PUT (``model_upload``), then
  ``model_register`` checks and records it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import tarfile
from datetime import datetime, timedelta
from typing import IO, Any

from sqlalchemy import Column, DateTime, Text, UniqueConstraint
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, SQLModel, col, select

from choline_core import deploy as contracts
from choline_core import rpc
from choline_core.bus import Bus, Nack
from choline_core.errors import BadSpec, BusError, NotFound, ObjectNotFound
from choline_core.events import Envelope, RunState, RunStateChanged
from choline_core.pipeline import artifact_prefix
from choline_core.storage import S3Store
from choline_core.subjects import Subjects, check_token
from choline_svc.db import session

from .models import aware, utcnow

log = logging.getLogger(__name__)

MAX_CARD_BYTES = 4 << 20
MAX_BUNDLE_BYTES = 64 << 30


class ModelRow(SQLModel, table=True):
    __tablename__ = "syncer_model"
    __table_args__ = (
        UniqueConstraint("owner", "name", "version", name="uq_syncer_model_version"),
        UniqueConstraint("owner", "name", "sha256", name="uq_syncer_model_bytes"),
    )

    id: int | None = Field(default=None, primary_key=True)
    owner: str = Field(max_length=128)
    name: str = Field(max_length=128)
    version: int
    key: str = Field(max_length=1200)
    size: int
    sha256: str = Field(max_length=64)
    run_id: str | None = Field(default=None, max_length=128)
    source: str | None = Field(default=None, max_length=32)
    card: str = Field(sa_column=Column(Text, nullable=False))  # JSON
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


def _info(row: ModelRow, *, card: bool = True) -> contracts.ModelVersionInfo:
    return contracts.ModelVersionInfo(
        name=row.name,
        version=row.version,
        owner=row.owner,
        key=row.key,
        size=row.size,
        sha256=row.sha256,
        run_id=row.run_id,
        source=row.source,
        created_at=aware(row.created_at) or utcnow(),
        card=json.loads(row.card) if card else {},
    )


class ModelStore:
    """Synchronous (``asyncio.to_thread``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def find(self, owner: str | None, name: str | None = None, version: int | None = None) -> list[ModelRow]:
        with session(self.engine) as s:
            q = select(ModelRow)
            if owner is not None:
                q = q.where(ModelRow.owner == owner)
            if name is not None:
                q = q.where(ModelRow.name == name)
            if version is not None:
                q = q.where(ModelRow.version == version)
            rows = list(s.exec(q.order_by(col(ModelRow.name), col(ModelRow.version).desc())).all())
            for r in rows:
                s.expunge(r)
            return rows

    def by_sha(self, owner: str, name: str, sha256: str) -> ModelRow | None:
        with session(self.engine) as s:
            row = s.exec(
                select(ModelRow).where(ModelRow.owner == owner, ModelRow.name == name, ModelRow.sha256 == sha256)
            ).first()
            if row is not None:
                s.expunge(row)
            return row

    def next_version(self, owner: str, name: str) -> int:
        rows = self.find(owner, name)
        return (max(r.version for r in rows) + 1) if rows else 1

    def insert(self, row: ModelRow) -> ModelRow | None:
        """The row, or None when (owner, name, version or sha256) is taken (a concurrent registration)."""
        try:
            with session(self.engine) as s:
                s.add(row)
                s.commit()
                s.refresh(row)
                s.expunge(row)
                return row
        except IntegrityError:
            return None


def read_card(fh: IO[bytes]) -> dict[str, Any]:
    """The ``<top>/card.json`` of a bundle tarball, streamed (the weights are skipped, not unpacked)."""
    try:
        with tarfile.open(fileobj=fh, mode="r|*") as tf:
            for m in tf:
                parts = m.name.strip("/").split("/")
                if len(parts) == 2 and parts[1] == "card.json" and m.isfile():
                    if m.size > MAX_CARD_BYTES:
                        raise BadSpec(f"the bundle's card.json is {m.size} bytes; more than a card should be")
                    data = tf.extractfile(m)
                    if data is None:
                        break
                    card = json.loads(data.read().decode("utf-8"))
                    if not isinstance(card, dict):
                        break
                    return card
    except (tarfile.TarError, OSError, EOFError, ValueError, UnicodeDecodeError) as exc:
        raise BadSpec(f"not a readable bundle tarball: {exc}") from None
    raise BadSpec("not a bundle: the tarball holds no <name>/card.json")


def check_card(card: dict[str, Any]) -> None:
    fmt = str(card.get("format", ""))
    if not fmt.startswith("choline-bundle/1"):
        raise BadSpec(f"the card's format {fmt!r} is not choline-bundle/1")
    inputs = card.get("inputs")
    if not card.get("purpose") or not isinstance(inputs, list) or not inputs:
        raise BadSpec("the card lacks its purpose or its inputs", hint="save the bundle with choline.save_bundle")


class Registry:
    """The model RPCs and the run-success hook."""

    def __init__(self, store: ModelStore, objects: S3Store, signer: Any, bus: Bus, subjects: Subjects) -> None:
        self.store = store
        self.objects = objects
        self.signer = signer  # () -> S3Store signing for the public endpoint
        self.bus = bus
        self.subjects = subjects
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ registering
    def _sha256(self, key: str) -> str:
        h = hashlib.sha256()
        with self.objects.open(key) as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        return h.hexdigest()

    def _card(self, key: str) -> dict[str, Any]:
        with self.objects.open(key) as fh:
            return read_card(fh)

    async def register(
        self,
        key: str,
        owner: str,
        *,
        sha256: str | None = None,
        run_id: str | None = None,
        source: str = "push",
        name: str | None = None,
    ) -> contracts.ModelVersionInfo:
        try:
            info = await asyncio.to_thread(self.objects.stat, key)
        except ObjectNotFound:
            raise NotFound(f"{key} is not in object storage", hint="upload the bundle first") from None
        if info.size > MAX_BUNDLE_BYTES:
            raise BadSpec(f"the bundle is {info.size} bytes; the limit is {MAX_BUNDLE_BYTES}")
        card = await asyncio.to_thread(self._card, key)
        check_card(card)
        name = name or str(card.get("name") or "")
        if not contracts.NAME_RE.match(name):
            raise BadSpec(f"{name!r} is not a model name", hint="give the card a name: letters, digits, '_', '.', '-'")
        digest = await asyncio.to_thread(self._sha256, key)
        if sha256 is not None and sha256 != digest:
            raise BadSpec("the uploaded bundle does not match its sha256 (damaged on the way?)", hint="push again")
        async with self._lock:  # one registration at a time in this process; the unique keys guard the rest
            for _ in range(5):
                existing = await asyncio.to_thread(self.store.by_sha, owner, name, digest)
                if existing is not None:
                    return _info(existing)
                version = await asyncio.to_thread(self.store.next_version, owner, name)
                dest = contracts.model_key(owner, name, version)
                await asyncio.to_thread(self._copy, key, dest, info.size)
                row = ModelRow(
                    owner=owner,
                    name=name,
                    version=version,
                    key=dest,
                    size=info.size,
                    sha256=digest,
                    run_id=run_id,
                    source=source,
                    card=json.dumps(card),
                    created_at=utcnow(),
                )
                stored = await asyncio.to_thread(self.store.insert, row)
                if stored is not None:
                    log.info("model %s/%s version %d registered (%s, %s)", owner, name, version, source, run_id or key)
                    return _info(stored)
        raise BusError(f"could not register {name}: versions kept changing under it", hint="try again")

    def _copy(self, src: str, dest: str, size: int) -> None:
        if src == dest:
            return
        with self.objects.open(src) as fh:
            self.objects.put_stream(dest, fh, size)

    async def on_run_event(self, env: Envelope) -> None:
        """``run.state_changed`` to ``succeeded``: register the run's bundle (if it made one) as a version."""
        if env.type != RunStateChanged.TYPE:
            return
        try:
            ev = env.event(RunStateChanged)
        except ValueError:
            return
        if ev.state != RunState.succeeded:
            return
        run_id = check_token(ev.run_id, "run id")
        prefix = artifact_prefix(run_id) + "/"
        bundles = await asyncio.to_thread(
            lambda: [o for o in self.objects.list(prefix) if o.key.endswith(contracts.BUNDLE_SUFFIX)]
        )
        if not bundles:
            return
        try:
            env_run = await self.bus.request(
                self.subjects.rpc(rpc.PROVISIONER, rpc.GET_RUN), rpc.RunQuery(run_id=run_id), timeout=10
            )
            rpc.raise_for_error(env_run)
            owner = env_run.event(rpc.RunInfo).owner
        except NotFound:
            owner = "admin"
        except BusError as exc:
            raise Nack(f"the provisioner is not answering: {exc}") from exc
        for obj in sorted(bundles, key=lambda o: o.key):
            try:
                info = await self.register(obj.key, owner, run_id=run_id, source="run")
                log.info("run %s: its bundle is model %s version %d", run_id, info.name, info.version)
            except BadSpec as exc:
                log.warning("run %s: %s is not registered: %s", run_id, obj.key, exc.one_line())

    # ------------------------------------------------------------------ RPCs
    async def rpc_models(self, env: Envelope) -> Envelope:
        q = _parse(env, contracts.ModelsQuery)
        rows = await asyncio.to_thread(self.store.find, q.owner, q.name)
        return contracts.ModelList(models=[_info(r, card=q.cards) for r in rows]).envelope()

    async def rpc_get(self, env: Envelope) -> Envelope:
        q = _parse(env, contracts.ModelGet)
        rows = await asyncio.to_thread(self.store.find, q.owner, q.name, q.version)
        if not rows:
            what = f"{q.name}:{q.version}" if q.version else q.name
            raise NotFound(f"no model {what}", hint="'choline models ls' lists yours")
        info = _info(rows[0])
        if q.presign:
            ttl = timedelta(seconds=max(60, min(q.expires_s, 7 * 24 * 3600)))
            info.url = await asyncio.to_thread(self.signer().presign_get, info.key, ttl)
        return info.envelope()

    async def rpc_upload(self, env: Envelope) -> Envelope:
        q = _parse(env, contracts.ModelUploadQuery)
        if len(q.sha256) != 64 or any(c not in "0123456789abcdef" for c in q.sha256):
            raise BadSpec("sha256 must be 64 lowercase hex digits")
        if not 0 < q.size <= MAX_BUNDLE_BYTES:
            raise BadSpec(f"a bundle is 1 to {MAX_BUNDLE_BYTES} bytes")
        key = contracts.upload_key(q.sha256)
        exists = await asyncio.to_thread(self.objects.exists, key)
        url = None if exists else await asyncio.to_thread(self.signer().presign_put, key, timedelta(hours=1))
        return contracts.ModelUpload(key=key, exists=exists, url=url).envelope()

    async def rpc_register(self, env: Envelope) -> Envelope:
        q = _parse(env, contracts.ModelRegister)
        if not q.key.startswith("models/_uploads/") and not q.key.startswith("runs/"):
            raise BadSpec("only an uploaded bundle or a run's artifact can be registered")
        if ".." in q.key.split("/"):
            raise BadSpec("bad key")
        try:
            info = await self.register(q.key, q.owner, sha256=q.sha256, run_id=q.run_id, source=q.source, name=q.name)
        except BadSpec:
            if q.key.startswith("models/_uploads/"):  # not a bundle (or not the one announced): not kept
                await asyncio.to_thread(self.objects.delete, q.key)
            raise
        if q.key.startswith("models/_uploads/"):
            await asyncio.to_thread(self.objects.delete, q.key)
        return info.envelope()


def _parse(env: Envelope, cls: type[Any]) -> Any:
    try:
        return env.event(cls)
    except ValueError as exc:
        raise BadSpec(f"not a {cls.TYPE}: {exc}") from None
