"""What the syncer does with each request and event.

Boxes (core NATS on ``<p>.runs.<run>.req.<method>``, queue group ``syncer``):

- ``presign``  ``PresignRequest`` -> ``PresignReply``: URLs for the run's own checkpoint, artifact and log
  objects (PUT or GET) and for content-addressed code bundles, env specs and datasets (GET only; see
  ``datasets``). The run comes from
  the subject, never from the payload, and the syncer computes every key, so a box reaches nothing else.
- ``resume``   ``ResumeRequest`` -> ``ResumeReply``: the newest complete checkpoint of the run (any
  attempt, by step), found in object storage itself (not the database, which may lag behind events),
  with presigned GETs for each file and the manifest.

URLs are signed for the S3 endpoint the requesting attempt's box reaches (``BoxEndpoints``), else the
control plane's own.

Run events (durable consumer ``syncer-runs``): ``BoxEndpoints`` (read model), ``CheckpointUploaded``
(manifest checked in object storage, recorded once, then retention: the newest ``keep`` by step plus the
best by a metric; older prefixes are deleted manifest first, so a half-deleted prefix is never
"complete"), ``ArtifactsUploaded`` (each object checked, then recorded).

A box publishes its events, so they are not trusted for keys: the prefix is recomputed from (run,
attempt, step) and every object is checked in storage, so a forged event can only re-record objects
that exist.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from choline_core import faults, pipeline
from choline_core.bus import Reject
from choline_core.errors import BadSpec, Forbidden, NotFound, ObjectNotFound
from choline_core.events import ArtifactsUploaded, CheckpointUploaded, ControlApplied, Envelope
from choline_core.storage import MANIFEST, S3Store
from choline_core.subjects import Subjects, check_token

from .settings import SyncerSettings
from .store import StoredCheckpoint, SyncerStore

if TYPE_CHECKING:
    from .datasets import Datasets

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
MAX_FILES = 10_000


def safe_name(name: str) -> str:
    """A relative, '/'-separated object name that stays under its prefix; ``BadSpec`` otherwise."""
    if (
        not name
        or len(name) > 1024
        or name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or any(part in ("", ".", "..") for part in name.split("/"))
    ):
        raise BadSpec(f"bad file name {name!r}: use a relative path without '.', '..' or empty parts")
    return name


def _digest(value: str | None, what: str) -> str:
    if not value or not _HEX64.match(value):
        raise BadSpec(f"{what} needs a sha256 digest (64 lowercase hex characters), not {value!r}")
    return value


def retained(rows: list[StoredCheckpoint], keep: int, metric: str, mode: str) -> set[int]:
    """Ids to keep: the newest ``keep`` by (step, attempt), plus the best finite ``metric`` (newest on ties)."""
    ordered = sorted(rows, key=lambda r: (r.step, r.attempt))
    kept = {r.id for r in ordered[-keep:]}
    if metric:
        scored = [
            (float(v), r)
            for r in ordered
            if isinstance(v := r.metrics.get(metric), (int, float)) and math.isfinite(float(v))
        ]
        if scored:
            sign = 1.0 if mode == "min" else -1.0
            best = min(scored, key=lambda vr: (sign * vr[0], -vr[1].step, -vr[1].attempt))[1]
            kept.add(best.id)
    return kept


class Syncer:
    def __init__(self, store: SyncerStore, objects: S3Store, settings: SyncerSettings) -> None:
        self.store = store
        self.objects = objects
        self.settings = settings
        self._signers: dict[str, S3Store] = {}
        self.datasets: Datasets | None = None  # set by the service (``datasets.Datasets``)

    # ------------------------------------------------------------------ signing
    def signer(self, endpoint: str) -> S3Store:
        """A client configured for ``endpoint`` that only signs (presigning makes no request)."""
        endpoint = endpoint.rstrip("/")
        if endpoint == self.objects.endpoint:
            return self.objects
        signer = self._signers.get(endpoint)
        if signer is None:
            s = self.settings
            signer = S3Store(
                endpoint,
                s.secret("s3_access_key") or "",
                s.secret("s3_secret_key") or "",
                self.objects.bucket,
                region=s.s3_region,
            )
            self._signers[endpoint] = signer
        return signer

    @property
    def ttl(self) -> timedelta:
        return timedelta(seconds=self.settings.syncer_url_ttl_s)

    async def box_signer(self, run_id: str, attempt: int) -> S3Store:
        endpoint = await asyncio.to_thread(self.store.endpoint_for, run_id, attempt)
        return self.signer(endpoint or self.objects.endpoint)

    def public_signer(self) -> S3Store:
        return self.signer(self.settings.s3_public_endpoint or self.objects.endpoint)

    # ------------------------------------------------------------------ box requests
    async def presign(self, subject: str, env: Envelope) -> Envelope:
        run_id = check_token(Subjects.run_id_of(subject), "run id")
        try:
            req = env.event(pipeline.PresignRequest)
        except ValueError as exc:
            raise BadSpec(f"not a presign request: {exc}") from None
        if req.attempt < 1:
            raise BadSpec("attempt must be 1 or more")
        if len(req.files) > MAX_FILES:
            raise BadSpec(f"at most {MAX_FILES} files per request")
        signer = await self.box_signer(run_id, req.attempt)
        ttl = self.ttl

        def sign(key: str) -> str:
            return signer.presign_put(key, ttl) if req.method == "PUT" else signer.presign_get(key, ttl)

        if req.purpose in ("code", "env"):
            if req.method != "GET":
                raise Forbidden(f"a box may only read {req.purpose} objects")
            digest = _digest(req.digest, f"a {req.purpose} request")
            key = pipeline.code_key(digest) if req.purpose == "code" else pipeline.env_key(digest)
            try:
                await asyncio.to_thread(self.objects.stat, key)
            except ObjectNotFound:
                raise NotFound(
                    f"the {req.purpose} object {key} is not in object storage",
                    hint="the CLI uploads it before the run starts; run it again",
                ) from None
            prefix, name = key.rsplit("/", 1)
            urls = {name: sign(key)}
        elif req.purpose == "dataset":
            if self.datasets is None:
                raise NotFound("this syncer keeps no datasets")
            prefix, urls = await self.datasets.box_urls(req, sign)
        elif req.purpose == "logs":
            key = pipeline.logs_key(run_id, req.attempt)
            prefix, name = key.rsplit("/", 1)
            urls = {name: sign(key)}
        elif req.purpose == "checkpoint":
            if req.step is None or req.step < 0:
                raise BadSpec("a checkpoint request needs its step")
            prefix = pipeline.checkpoint_prefix(run_id, req.attempt, req.step)
            names = [safe_name(f) for f in req.files]
            urls = {n: sign(f"{prefix}/{n}") for n in names}
        elif req.purpose == "artifact":
            prefix = pipeline.artifact_prefix(run_id)
            names = [safe_name(f) for f in req.files]
            urls = {n: sign(f"{prefix}/{n}") for n in names}
        else:  # pragma: no cover - the Literal type refuses others when parsing
            raise BadSpec(f"unknown purpose {req.purpose!r}")
        return pipeline.PresignReply(prefix=prefix, urls=urls).envelope(run_id=run_id)

    def newest_complete(self, run_id: str) -> tuple[int, int, str, bytes, dict[str, Any]] | None:
        """(step, attempt, prefix, manifest bytes, manifest) of the newest intact checkpoint in storage."""
        found: list[tuple[int, int]] = []
        for obj in self.objects.list(f"runs/{run_id}/attempts/"):
            parts = obj.key.split("/")
            if (
                len(parts) == 7
                and parts[4] == "checkpoints"
                and parts[6] == MANIFEST
                and parts[3].isdigit()
                and parts[5].isdigit()
            ):
                found.append((int(parts[5]), int(parts[3])))
        for step, attempt in sorted(found, reverse=True):
            prefix = pipeline.checkpoint_prefix(run_id, attempt, step)
            try:
                raw = self.objects.get_bytes(f"{prefix}/{MANIFEST}")
                manifest = json.loads(raw)
                entries = manifest["files"]
                for entry in entries:
                    safe_name(entry["path"])
                    if self.objects.stat(f"{prefix}/{entry['path']}").size != int(entry["size"]):
                        raise ValueError(f"{entry['path']} has the wrong size")
            except (ObjectNotFound, ValueError, KeyError, TypeError, BadSpec) as exc:
                log.warning("checkpoint %s is not intact (%s); looking at older ones", prefix, exc)
                continue
            return step, attempt, prefix, raw, manifest
        return None

    async def resume(self, subject: str, env: Envelope) -> Envelope:
        run_id = check_token(Subjects.run_id_of(subject), "run id")
        try:
            req = env.event(pipeline.ResumeRequest)
        except ValueError as exc:
            raise BadSpec(f"not a resume request: {exc}") from None
        found = await asyncio.to_thread(self.newest_complete, run_id)
        controls = await asyncio.to_thread(self.store.controls, run_id)
        if found is None:
            return pipeline.ResumeReply(controls=controls).envelope(run_id=run_id)
        step, attempt, prefix, raw, manifest = found
        signer = await self.box_signer(run_id, req.attempt)
        ttl = self.ttl
        files = [
            pipeline.ResumeFile(
                path=e["path"],
                size=int(e["size"]),
                sha256=str(e["sha256"]),
                url=signer.presign_get(f"{prefix}/{e['path']}", ttl),
            )
            for e in manifest["files"]
        ]
        files.append(
            pipeline.ResumeFile(
                path=MANIFEST,
                size=len(raw),
                sha256=hashlib.sha256(raw).hexdigest(),
                url=signer.presign_get(f"{prefix}/{MANIFEST}", ttl),
            )
        )
        log.info("run %s attempt %d resumes from step %d (attempt %d)", run_id, req.attempt, step, attempt)
        return pipeline.ResumeReply(step=step, attempt=attempt, prefix=prefix, files=files, controls=controls).envelope(
            run_id=run_id
        )

    # ------------------------------------------------------------------ run events
    async def on_run_event(self, env: Envelope) -> None:
        if env.type == pipeline.BoxEndpoints.TYPE:
            ev = _parse(env, pipeline.BoxEndpoints)
            await asyncio.to_thread(self.store.record_endpoint, ev.run_id, ev.attempt, ev.box_id, ev.s3_endpoint)
            log.info("run %s attempt %d: box S3 endpoint %s", ev.run_id, ev.attempt, ev.s3_endpoint)
        elif env.type == CheckpointUploaded.TYPE:
            await self.on_checkpoint(_parse(env, CheckpointUploaded), env)
        elif env.type == ControlApplied.TYPE:
            ev = _parse(env, ControlApplied)
            if "id" in ev.ack and "step" in ev.ack:
                await asyncio.to_thread(self.store.record_control, _run_of(ev.run_id, env), ev.attempt, ev.ack)
        elif env.type == ArtifactsUploaded.TYPE:
            await self.on_artifacts(_parse(env, ArtifactsUploaded), env)

    async def on_checkpoint(self, ev: CheckpointUploaded, env: Envelope) -> None:
        run_id = _run_of(ev.run_id, env)
        prefix = pipeline.checkpoint_prefix(run_id, ev.attempt, ev.step)
        manifest = await asyncio.to_thread(self.objects.read_manifest, prefix)
        if manifest is None:
            known = await asyncio.to_thread(self.store.checkpoints, run_id, include_deleted=True)
            if any(c.attempt == ev.attempt and c.step == ev.step for c in known):
                return  # recorded before and since removed by retention: a redelivery
            # the agent announces a checkpoint only after its manifest is stored (and S3 reads its own
            # writes): a missing manifest is a broken or forged event, not a passing fault
            raise Reject(f"no manifest under {prefix}: the checkpoint is not complete")
        try:
            files = [
                {"path": safe_name(str(e["path"])), "size": int(e["size"]), "sha256": str(e["sha256"])}
                for e in manifest["files"]
            ]
        except (KeyError, TypeError, ValueError, BadSpec) as exc:
            raise Reject(f"manifest under {prefix} is unreadable: {exc}") from None
        for f in files:
            try:
                info = await asyncio.to_thread(self.objects.stat, f"{prefix}/{f['path']}")
            except ObjectNotFound:
                raise Reject(f"{prefix}/{f['path']} is missing: the checkpoint is not complete") from None
            if info.size != f["size"]:
                raise Reject(f"{prefix}/{f['path']} has {info.size} bytes, its manifest says {f['size']}")
        await faults.abarrier("syncer.checkpoint.before_record")
        raw_metrics = manifest.get("metrics") if isinstance(manifest.get("metrics"), dict) else ev.metrics
        metrics = {str(k): _finite(v) for k, v in (raw_metrics or {}).items()}
        _, inserted = await asyncio.to_thread(
            self.store.record_checkpoint,
            run_id=run_id,
            attempt=ev.attempt,
            step=ev.step,
            prefix=prefix,
            reason=str(manifest.get("reason") or ev.reason),
            files=files,
            metrics=metrics,
        )
        if inserted:
            log.info("run %s: checkpoint step %d of attempt %d recorded", run_id, ev.step, ev.attempt)
        await self.apply_retention(run_id)

    async def apply_retention(self, run_id: str) -> list[StoredCheckpoint]:
        """Delete what retention does not keep (manifest first); returns the deleted checkpoints."""
        s = self.settings
        rows = await asyncio.to_thread(self.store.checkpoints, run_id)
        kept = retained(rows, s.syncer_keep, s.syncer_best_metric, s.syncer_best_mode)
        doomed = [r for r in rows if r.id not in kept]
        for r in doomed:
            await asyncio.to_thread(self.objects.delete, f"{r.prefix}/{MANIFEST}")
            await asyncio.to_thread(self.objects.delete_prefix, f"{r.prefix}/")
            await asyncio.to_thread(self.store.mark_deleted, [r.id])
            log.info("run %s: retention removed checkpoint step %d (attempt %d)", run_id, r.step, r.attempt)
        return doomed

    async def on_artifacts(self, ev: ArtifactsUploaded, env: Envelope) -> None:
        run_id = _run_of(ev.run_id, env)
        prefix = pipeline.artifact_prefix(run_id)
        rows: list[tuple[str, int, str, str, bool]] = []
        for f in ev.files:
            try:
                path = safe_name(f.path)
            except BadSpec as exc:
                log.warning("run %s: skipping artifact %s", run_id, exc)
                continue
            key = f"{prefix}/{path}"
            try:
                info = await asyncio.to_thread(self.objects.stat, key)
            except ObjectNotFound:
                log.warning("run %s: artifact %s was announced but is not in object storage", run_id, key)
                continue
            bundle = ev.bundle is not None and ev.bundle in (key, path)
            rows.append((path, info.size, f.sha256, key, bundle))
        changed = await asyncio.to_thread(self.store.record_artifacts, run_id, ev.attempt, rows)
        log.info("run %s: %d artifacts recorded (%d new or changed)", run_id, len(rows), changed)

    # ------------------------------------------------------------------ gateway / CLI
    async def rpc_upload(self, env: Envelope) -> Envelope:
        try:
            q = env.event(pipeline.UploadQuery)
        except ValueError as exc:
            raise BadSpec(f"not an upload query: {exc}") from None
        digest = _digest(q.digest, f"a {q.kind} upload")
        key = pipeline.code_key(digest) if q.kind == "code" else pipeline.env_key(digest)
        exists = await asyncio.to_thread(self.objects.exists, key)
        url = None if exists else await asyncio.to_thread(self.public_signer().presign_put, key, self.ttl)
        return pipeline.UploadReply(key=key, exists=exists, url=url).envelope()

    async def rpc_checkpoints(self, env: Envelope) -> Envelope:
        try:
            q = env.event(pipeline.CheckpointsQuery)
        except ValueError as exc:
            raise BadSpec(f"not a checkpoints query: {exc}") from None
        rows = await asyncio.to_thread(self.store.checkpoints, q.run_id, include_deleted=q.include_deleted)
        return pipeline.CheckpointList(run_id=q.run_id, checkpoints=[r.info() for r in rows]).envelope(run_id=q.run_id)

    async def rpc_artifacts(self, env: Envelope) -> Envelope:
        try:
            q = env.event(pipeline.ArtifactsQuery)
        except ValueError as exc:
            raise BadSpec(f"not an artifacts query: {exc}") from None
        check_token(q.run_id, "run id")
        ttl = timedelta(seconds=max(60, min(q.expires_s, 7 * 24 * 3600)))
        signer = self.public_signer()
        rows = await asyncio.to_thread(self.store.artifacts, q.run_id)
        out: list[pipeline.ArtifactInfo] = []
        bundle: str | None = None
        for info, is_bundle in rows:
            if q.presign:
                info.url = signer.presign_get(info.key, ttl)
            if is_bundle:
                bundle = info.path
            out.append(info)
        logs: list[pipeline.LogInfo] = []
        for obj in await asyncio.to_thread(lambda: list(self.objects.list(f"runs/{q.run_id}/logs/"))):
            m = re.fullmatch(r".*/attempt-(\d+)\.txt", obj.key)
            if m:
                url = signer.presign_get(obj.key, ttl) if q.presign else None
                logs.append(pipeline.LogInfo(attempt=int(m.group(1)), key=obj.key, size=obj.size, url=url))
        logs.sort(key=lambda li: li.attempt)
        return pipeline.ArtifactList(run_id=q.run_id, artifacts=out, bundle=bundle, logs=logs).envelope(run_id=q.run_id)


def _parse(env: Envelope, cls: type[Any]) -> Any:
    try:
        return env.event(cls)
    except ValueError as exc:
        raise Reject(f"unreadable {cls.TYPE} event: {exc}") from None


def _run_of(run_id: str, env: Envelope) -> str:
    if env.run_id is not None and env.run_id != run_id:
        raise Reject(f"envelope run {env.run_id!r} and event run {run_id!r} differ")
    try:
        return check_token(run_id, "run id")
    except ValueError as exc:
        raise Reject(str(exc)) from None


def _finite(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
