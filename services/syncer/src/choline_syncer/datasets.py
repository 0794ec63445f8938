"""The syncer's dataset work: the chunk index, verified packs, versions, and presigned URLs for them.

Gateway RPCs (``<p>.rpc.syncer.<method>``):

- ``dataset_chunks``: which chunks are indexed, and where (pack, offset, length);
- ``dataset_upload``: presigned PUTs for packs (``data/packs/<sha256>``) or a manifest
  (``data/<name>/manifest/<sha256>``), or ``exists`` when the object is stored already;
- ``dataset_register``: read each uploaded pack back, check its footer, that its index hashes to the pack's
  name and that every chunk hashes to its index entry, then index the chunks. A pack that fails is deleted
  from object storage (a wrong object there would block the right one) and reported as ``bad``;
- ``dataset_commit``: the manifest must be stored, match its digest, pass ``validate_tree`` (safe paths,
  links inside), name only chunks indexed at exactly those places, and every pack must still be in object
  storage (HEAD); only then is it recorded as the dataset's newest version;
- ``datasets`` and ``dataset_urls``: listing, and presigned GETs for a version's manifest and packs.

Boxes ask on their run's ``presign`` subject with ``purpose="dataset"``: ``digest`` is the manifest and
``files`` the packs they want; only committed versions, and only packs the version uses, are signed, GET only.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from choline_core import pipeline
from choline_core.errors import BadSpec, Conflict, Forbidden, NotFound, ObjectNotFound
from choline_core.events import Envelope
from choline_core.pipeline import (
    PACK_FOOTER,
    DatasetManifest,
    check_dataset_name,
    check_sha,
    manifest_key,
    pack_key,
    parse_pack_footer,
    parse_pack_index,
)

from .dataset_store import DatasetStore

if TYPE_CHECKING:
    from .handlers import Syncer

log = logging.getLogger(__name__)


def _parse(env: Envelope, cls: type[Any], what: str) -> Any:
    try:
        return env.event(cls)
    except ValueError as exc:
        raise BadSpec(f"not a {what}: {str(exc)[:300]}") from None


class Datasets:
    def __init__(self, syncer: Syncer, store: DatasetStore) -> None:
        self.syncer = syncer
        self.store = store
        self.objects = syncer.objects

    # ------------------------------------------------------------------ gateway RPCs
    async def rpc_chunks(self, env: Envelope) -> Envelope:
        q = _parse(env, pipeline.DatasetChunksQuery, "chunks query")
        shas = [check_sha(c, "a chunk digest") for c in q.chunks]
        found = await asyncio.to_thread(self.store.lookup, shas)
        packs = sorted({p for p, _, _ in found.values()})
        index = {p: i for i, p in enumerate(packs)}
        return pipeline.DatasetChunksReply(
            packs=packs, found={sha: (index[p], off, n) for sha, (p, off, n) in found.items()}
        ).envelope()

    async def rpc_upload(self, env: Envelope) -> Envelope:
        q = _parse(env, pipeline.DatasetUploadQuery, "dataset upload query")
        digests = [check_sha(d) for d in q.digests]
        if q.kind == "manifest":
            name = check_dataset_name(q.name or "")
            keys = {d: manifest_key(name, d) for d in digests}
        else:
            keys = {d: pack_key(d) for d in digests}
        known = await asyncio.to_thread(self.store.known_packs, digests) if q.kind == "pack" else set()
        signer = self.syncer.public_signer()
        items = []
        for d, key in keys.items():
            exists = d in known or await asyncio.to_thread(self.objects.exists, key)
            url = None if exists else signer.presign_put(key, self.syncer.ttl)
            items.append(pipeline.DatasetUploadItem(digest=d, key=key, exists=exists, url=url))
        return pipeline.DatasetUploadReply(items=items).envelope()

    async def rpc_register(self, env: Envelope) -> Envelope:
        q = _parse(env, pipeline.DatasetRegister, "pack registration")
        digests = [check_sha(d, "a pack digest") for d in q.packs]
        reply = pipeline.DatasetRegistered()
        known = await asyncio.to_thread(self.store.known_packs, digests)
        for d in digests:
            if d in known:
                reply.packs.append(d)
                continue
            outcome, detail = await asyncio.to_thread(self.verify_pack, d)
            if outcome == "missing":
                reply.missing.append(d)
            elif outcome == "bad":
                log.warning("pack %s failed verification (%s); deleted", d[:12], detail)
                await asyncio.to_thread(self.objects.delete, pack_key(d))
                reply.bad.append(d)
            else:
                size, chunks = detail
                reply.chunks += await asyncio.to_thread(self.store.record_pack, d, size, chunks)
                reply.packs.append(d)
        return reply.envelope()

    def verify_pack(self, digest: str) -> tuple[str, Any]:
        """("ok", (size, chunks)) | ("missing", None) | ("bad", reason)."""
        key = pack_key(digest)
        try:
            size = self.objects.stat(key).size
            if size < PACK_FOOTER:
                return "bad", "shorter than a footer"
            if not self.syncer.settings.syncer_verify_packs:
                index_len = parse_pack_footer(self.objects.get_bytes(key, size - PACK_FOOTER, PACK_FOOTER))
                body = size - PACK_FOOTER - index_len
                if body < 0:
                    return "bad", "index longer than the pack"
                raw = self.objects.get_bytes(key, body, index_len) if index_len else b""
                if hashlib.sha256(raw).hexdigest() != digest:
                    return "bad", "its index does not hash to its name"
                return "ok", (size, parse_pack_index(raw, body))
            data = self.objects.get_bytes(key)
        except ObjectNotFound:
            return "missing", None
        except BadSpec as exc:
            return "bad", exc.message
        if len(data) != size:
            return "bad", f"{len(data)} bytes read, {size} stored"
        try:
            index_len = parse_pack_footer(data[-PACK_FOOTER:])
            body = len(data) - PACK_FOOTER - index_len
            if body < 0:
                return "bad", "index longer than the pack"
            raw_index = data[body : body + index_len]
            chunks = parse_pack_index(raw_index, body)
        except BadSpec as exc:
            return "bad", exc.message
        if hashlib.sha256(raw_index).hexdigest() != digest:
            return "bad", "its index does not hash to its name"
        view = memoryview(data)
        for sha, off, n in chunks:
            if hashlib.sha256(view[off : off + n]).hexdigest() != sha:
                return "bad", f"chunk {sha[:12]} at {off} does not match its hash"
        return "ok", (size, chunks)

    async def rpc_commit(self, env: Envelope) -> Envelope:
        q = _parse(env, pipeline.DatasetCommit, "dataset commit")
        name = check_dataset_name(q.name)
        digest = check_sha(q.manifest, "the manifest digest")
        try:
            raw = await asyncio.to_thread(self.objects.get_bytes, manifest_key(name, digest))
        except ObjectNotFound:
            raise NotFound(
                f"the manifest {digest[:12]} of {name!r} is not in object storage", hint="upload it, then commit"
            ) from None
        manifest = await asyncio.to_thread(DatasetManifest.from_bytes, raw, digest)
        refs = {(sha, manifest.packs[p], off, n) for f in manifest.files for p, off, n, sha in f.chunks}
        have = await asyncio.to_thread(self.store.places, [r[0] for r in refs])
        missing = refs - have
        if missing:
            sha, pack, off, _ = sorted(missing)[0]
            raise Conflict(
                f"{len(missing)} chunk(s) of the manifest are not stored where it says (e.g. {sha[:12]} "
                f"in pack {pack[:12]} at {off})",
                hint="push the dataset again",
            )
        gone = await asyncio.to_thread(self.missing_packs, manifest.packs)
        if gone:
            for d in gone:
                await asyncio.to_thread(self.store.forget_pack, d)
            raise Conflict(
                f"{len(gone)} pack(s) of the dataset are gone from object storage (e.g. {gone[0][:12]})",
                hint="push the dataset again: their chunks will be uploaded again",
            )
        version = await asyncio.to_thread(
            lambda: self.store.add_version(
                owner=q.owner,
                name=name,
                manifest=digest,
                size=manifest.size,
                files=len(manifest.files),
                chunks=manifest.chunk_count(),
                packs=list(manifest.packs),
                source=q.source,
            )
        )
        log.info("dataset %s of %s: version %s (%d bytes)", name, q.owner, digest[:12], version.size)
        return pipeline.DatasetCommitted(version=version.info()).envelope()

    def missing_packs(self, packs: list[str]) -> list[str]:
        def gone(d: str) -> str | None:
            return None if self.objects.exists(pack_key(d)) else d

        with ThreadPoolExecutor(16) as pool:
            return [d for d in pool.map(gone, packs) if d is not None]

    async def rpc_list(self, env: Envelope) -> Envelope:
        q = _parse(env, pipeline.DatasetsQuery, "datasets query")
        if q.name is not None:
            check_dataset_name(q.name)
        rows = await asyncio.to_thread(self.store.versions, q.owner, q.name)
        groups: dict[tuple[str, str], list[Any]] = {}
        for r in rows:
            groups.setdefault((r.owner, r.name), []).append(r)
        out = [
            pipeline.DatasetInfo(
                name=name,
                owner=owner,
                latest=vs[0].info(),
                versions=[v.info() for v in vs] if q.name is not None else [],
            )
            for (owner, name), vs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0]))
        ]
        return pipeline.DatasetList(datasets=out).envelope()

    async def rpc_urls(self, env: Envelope) -> Envelope:
        q = _parse(env, pipeline.DatasetUrlsQuery, "dataset URL query")
        name = check_dataset_name(q.name)
        version = await asyncio.to_thread(self.store.find, q.owner, name, q.manifest)
        allowed = set(version.packs)
        for p in q.packs:
            if p not in allowed:
                raise Forbidden(f"pack {str(p)[:12]} is not part of {name} {version.manifest[:12]}")
        ttl = timedelta(seconds=max(60, min(q.expires_s, 7 * 24 * 3600)))
        signer = self.syncer.public_signer()
        return pipeline.DatasetUrls(
            version=version.info(),
            manifest_url=signer.presign_get(manifest_key(name, version.manifest), ttl),
            urls={p: signer.presign_get(pack_key(p), ttl) for p in q.packs},
        ).envelope()

    # ------------------------------------------------------------------ boxes
    async def box_urls(self, req: pipeline.PresignRequest, sign: Any) -> tuple[str, dict[str, str]]:
        """A box's presign request for a dataset: the manifest's URL and the packs' (GET only)."""
        if req.method != "GET":
            raise Forbidden("a box may only read datasets")
        digest = check_sha(req.digest or "", "the dataset's manifest digest")
        version = await asyncio.to_thread(self.store.by_manifest, digest)
        if version is None:
            raise NotFound(
                f"no dataset version {digest[:12]} is committed", hint="'choline data push' it, then run again"
            )
        allowed = set(version.packs)
        for p in req.files:
            if p not in allowed:
                raise Forbidden(f"pack {str(p)[:12]} is not part of dataset {version.name} {digest[:12]}")
        urls = {"manifest": sign(manifest_key(version.name, digest))}
        urls.update({p: sign(pack_key(p)) for p in req.files})
        return f"data/{version.name}", urls
