"""The syncer against a real nats-server, a real S3 server (SeaweedFS) and a real database.

A box's requests are scoped by the subject's run; keys are the syncer's; checkpoints are recorded only
once their manifest is in storage; retention keeps the newest K plus the best; resume finds the newest
complete checkpoint of any attempt; URLs are signed for the endpoint a box's tunnel exposes.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import urllib.error
import uuid

import pytest
from sqlalchemy import create_engine, text

from choline_core import pipeline
from choline_core.bus import Bus
from choline_core.embedded import NatsServer, WeedServer
from choline_core.errors import BadSpec, Forbidden, NotFound
from choline_core.events import ArtifactsUploaded, CheckpointFile, CheckpointUploaded
from choline_core.rpc import raise_for_error
from choline_core.storage import S3Store
from choline_core.subjects import Subjects
from choline_syncer.handlers import retained, safe_name
from choline_syncer.main import SyncerService
from choline_syncer.store import StoredCheckpoint

from .conftest import (
    Forwarder,
    Plane,
    eventually,
    http_get,
    http_put,
    manifest_bytes,
    new_run,
    running,
    syncer_settings,
)


async def upload_checkpoint(
    plane: Plane, run: str, attempt: int, step: int, metrics: dict[str, float] | None = None, publish: bool = True
) -> str:
    """Play the agent's side of the hand-off: presign, files, manifest last, then the event."""
    files = {"model.bin": f"weights {step}".encode() * 10, "state/opt.bin": f"opt {step}".encode()}
    req = pipeline.PresignRequest(attempt=attempt, purpose="checkpoint", step=step, files=[*files, "manifest.json"])
    reply = raise_for_error(await plane.box_request(run, pipeline.PRESIGN_METHOD, req)).event(pipeline.PresignReply)
    for name, data in files.items():
        await asyncio.to_thread(http_put, reply.urls[name], data)
    manifest = manifest_bytes(step, files, metrics=metrics or {})
    await asyncio.to_thread(http_put, reply.urls["manifest.json"], manifest)
    if publish:
        ev = CheckpointUploaded(
            run_id=run,
            attempt=attempt,
            step=step,
            prefix=reply.prefix,
            files=[CheckpointFile(path=k, size=len(v), sha256=hashlib.sha256(v).hexdigest()) for k, v in files.items()],
            metrics=metrics or {},
        )
        await plane.bus.publish(plane.subjects.run_events(run), ev.envelope(run_id=run))
    return reply.prefix


async def checkpoints(plane: Plane, run: str, include_deleted: bool = False) -> list[pipeline.CheckpointInfo]:
    env = await plane.rpc(
        pipeline.SYNCER_CHECKPOINTS, pipeline.CheckpointsQuery(run_id=run, include_deleted=include_deleted)
    )
    return env.event(pipeline.CheckpointList).checkpoints


async def test_checkpoint_recorded_once_manifest_last_and_listed(plane: Plane) -> None:
    run = new_run()
    prefix = await upload_checkpoint(plane, run, 1, 10, {"val_loss": 0.5})
    assert prefix == f"runs/{run}/attempts/1/checkpoints/10"
    rows = await eventually(lambda: checkpoints(plane, run), what="the checkpoint row")
    assert [(c.attempt, c.step, c.files) for c in rows] == [(1, 10, 2)]
    assert rows[0].metrics == {"val_loss": 0.5} and rows[0].size > 0
    # the same event again (a redelivery, or the agent replaying its journal): still one row
    ev = CheckpointUploaded(run_id=run, attempt=1, step=10, prefix=prefix)
    await plane.bus.publish(plane.subjects.run_events(run), ev.envelope(run_id=run))
    await asyncio.sleep(0.5)
    assert len(await checkpoints(plane, run)) == 1


async def test_checkpoint_without_manifest_is_not_recorded(plane: Plane) -> None:
    run = new_run()
    # files uploaded, manifest never written, event published anyway (a lying or broken box)
    req = pipeline.PresignRequest(attempt=1, purpose="checkpoint", step=3, files=["model.bin"])
    reply = raise_for_error(await plane.box_request(run, pipeline.PRESIGN_METHOD, req)).event(pipeline.PresignReply)
    await asyncio.to_thread(http_put, reply.urls["model.bin"], b"x" * 10)
    ev = CheckpointUploaded(run_id=run, attempt=1, step=3, prefix=reply.prefix)
    await plane.bus.publish(plane.subjects.run_events(run), ev.envelope(run_id=run))
    await asyncio.sleep(1.0)
    assert await checkpoints(plane, run) == []
    resume = raise_for_error(
        await plane.box_request(run, pipeline.RESUME_METHOD, pipeline.ResumeRequest(attempt=2))
    ).event(pipeline.ResumeReply)
    assert resume.step is None


async def test_retention_keeps_last_k_plus_best(plane: Plane) -> None:
    run = new_run()
    losses = {2: 0.9, 4: 0.1, 6: 0.5, 8: 0.6, 10: 0.7, 12: 0.8}
    for step, loss in losses.items():
        await upload_checkpoint(plane, run, 1, step, {"val_loss": loss})
    live = await eventually(
        lambda: _steps_if(checkpoints(plane, run), {4, 8, 10, 12}), what="retention to settle on 4, 8, 10, 12"
    )
    assert live == [4, 8, 10, 12]  # the newest three plus the best val_loss (step 4)
    for step in (2, 6):
        prefix = pipeline.checkpoint_prefix(run, 1, step)
        assert list(plane.store.list(prefix + "/")) == [], f"step {step} should be gone from S3"
    for step in (4, 8, 10, 12):
        assert plane.store.read_manifest(pipeline.checkpoint_prefix(run, 1, step)) is not None
    everything = await checkpoints(plane, run, include_deleted=True)
    assert {c.step for c in everything if c.deleted_at is not None} == {2, 6}


async def _steps_if(coro: object, want: set[int]) -> list[int] | None:
    rows = await coro  # type: ignore[misc]
    steps = sorted(c.step for c in rows)
    return steps if set(steps) == want else None


def test_retention_rule() -> None:
    def row(i: int, step: int, attempt: int = 1, **metrics: float) -> StoredCheckpoint:
        return StoredCheckpoint(
            i, "r", attempt, step, "p", "periodic", 0, [], dict(metrics), datetime.datetime.now(), None
        )

    rows = [row(1, 5, val_loss=0.2), row(2, 10, val_loss=0.4), row(3, 10, attempt=2, val_loss=0.3), row(4, 15)]
    assert retained(rows, 2, "val_loss", "min") == {3, 4, 1}
    assert retained(rows, 2, "val_loss", "max") == {3, 4, 2}
    assert retained(rows, 1, "", "min") == {4}
    nan = [row(1, 1, val_loss=float("nan")), row(2, 2)]
    assert retained(nan, 1, "val_loss", "min") == {2}


async def test_resume_picks_newest_complete_across_attempts(plane: Plane) -> None:
    run = new_run()
    await upload_checkpoint(plane, run, 1, 20)
    await upload_checkpoint(plane, run, 2, 30)
    # attempt 2 started step 40 and died before its manifest: incomplete, never chosen
    req = pipeline.PresignRequest(attempt=2, purpose="checkpoint", step=40, files=["model.bin"])
    reply = raise_for_error(await plane.box_request(run, pipeline.PRESIGN_METHOD, req)).event(pipeline.PresignReply)
    await asyncio.to_thread(http_put, reply.urls["model.bin"], b"partial")
    resume = raise_for_error(
        await plane.box_request(run, pipeline.RESUME_METHOD, pipeline.ResumeRequest(attempt=3))
    ).event(pipeline.ResumeReply)
    assert (resume.step, resume.attempt) == (30, 2)
    names = [f.path for f in resume.files]
    assert names[-1] == "manifest.json" and set(names) == {"model.bin", "state/opt.bin", "manifest.json"}
    for f in resume.files:
        data = await asyncio.to_thread(http_get, f.url)
        assert len(data) == f.size and hashlib.sha256(data).hexdigest() == f.sha256


async def test_a_box_reaches_only_its_own_run(plane: Plane) -> None:
    mine, theirs = new_run(), new_run()
    await upload_checkpoint(plane, theirs, 1, 5)
    # the envelope claims the other run; the subject (what NATS permissions enforce) decides
    req = pipeline.PresignRequest(attempt=1, purpose="checkpoint", method="GET", step=5, files=["model.bin"])
    reply = raise_for_error(
        await plane.bus.request(
            plane.subjects.run_request(mine, pipeline.PRESIGN_METHOD), req.envelope(run_id=theirs), timeout=10
        )
    ).event(pipeline.PresignReply)
    assert reply.prefix.startswith(f"runs/{mine}/")
    with pytest.raises(urllib.error.HTTPError):
        await asyncio.to_thread(http_get, reply.urls["model.bin"])  # there is nothing of "mine" there
    for bad in ("../../" + theirs + "/attempts/1/checkpoints/5/model.bin", "/etc/passwd", "a/./b", ""):
        req = pipeline.PresignRequest(attempt=1, purpose="artifact", method="GET", files=[bad])
        with pytest.raises(BadSpec):
            raise_for_error(await plane.box_request(mine, pipeline.PRESIGN_METHOD, req))
    resume = raise_for_error(
        await plane.box_request(mine, pipeline.RESUME_METHOD, pipeline.ResumeRequest(attempt=1).envelope(run_id=theirs))
    ).event(pipeline.ResumeReply)
    assert resume.step is None
    # code is readable by digest only, never writable from a box
    digest = plane.put_code(b"bundle bytes")
    req = pipeline.PresignRequest(attempt=1, purpose="code", method="PUT", digest=digest)
    with pytest.raises(Forbidden):
        raise_for_error(await plane.box_request(mine, pipeline.PRESIGN_METHOD, req))
    req = pipeline.PresignRequest(attempt=1, purpose="code", method="GET", digest=digest)
    reply = raise_for_error(await plane.box_request(mine, pipeline.PRESIGN_METHOD, req)).event(pipeline.PresignReply)
    assert await asyncio.to_thread(http_get, reply.urls[f"{digest}.tar.gz"]) == b"bundle bytes"
    req = pipeline.PresignRequest(attempt=1, purpose="code", method="GET", digest="0" * 64)
    with pytest.raises(NotFound):
        raise_for_error(await plane.box_request(mine, pipeline.PRESIGN_METHOD, req))
    req = pipeline.PresignRequest(attempt=1, purpose="env", method="GET", digest="../x")
    with pytest.raises(BadSpec):
        raise_for_error(await plane.box_request(mine, pipeline.PRESIGN_METHOD, req))


async def test_urls_are_signed_for_the_boxs_tunnel_endpoint(plane: Plane, forwarder: Forwarder) -> None:
    run = new_run()
    endpoint = f"http://127.0.0.1:{forwarder.port}"
    ev = pipeline.BoxEndpoints(run_id=run, attempt=1, box_id="b1", nats_url="nats://127.0.0.1:1", s3_endpoint=endpoint)
    await plane.bus.publish(plane.subjects.run_events(run), ev.envelope(run_id=run))
    req = pipeline.PresignRequest(attempt=1, purpose="artifact", files=["out.txt"])

    async def signed_for_tunnel() -> pipeline.PresignReply | None:
        r = raise_for_error(await plane.box_request(run, pipeline.PRESIGN_METHOD, req)).event(pipeline.PresignReply)
        return r if r.urls["out.txt"].startswith(endpoint + "/") else None

    reply = await eventually(signed_for_tunnel, what="a URL for the tunnel's port")
    assert await asyncio.to_thread(http_put, reply.urls["out.txt"], b"through the tunnel") == 200
    assert forwarder.connections >= 1
    assert plane.store.get_bytes(f"runs/{run}/artifacts/out.txt") == b"through the tunnel"
    # another attempt of the run without an endpoint event gets the control plane's own endpoint
    req2 = pipeline.PresignRequest(attempt=2, purpose="artifact", files=["out.txt"])
    r2 = raise_for_error(await plane.box_request(run, pipeline.PRESIGN_METHOD, req2)).event(pipeline.PresignReply)
    assert r2.urls["out.txt"].startswith(plane.s3.endpoint + "/")


async def test_upload_rpc_is_content_addressed(plane: Plane) -> None:
    data = b"a code bundle"
    digest = hashlib.sha256(data).hexdigest()
    env = await plane.rpc(pipeline.SYNCER_UPLOAD, pipeline.UploadQuery(kind="code", digest=digest))
    first = env.event(pipeline.UploadReply)
    assert first.key == f"code/{digest}.tar.gz" and not first.exists and first.url
    await asyncio.to_thread(http_put, first.url, data)
    second = (await plane.rpc(pipeline.SYNCER_UPLOAD, pipeline.UploadQuery(kind="code", digest=digest))).event(
        pipeline.UploadReply
    )
    assert second.exists and second.url is None
    with pytest.raises(BadSpec):
        await plane.rpc(pipeline.SYNCER_UPLOAD, pipeline.UploadQuery(kind="env", digest="nothex"))


async def test_artifacts_recorded_and_listed_with_urls(plane: Plane) -> None:
    run = new_run()
    files = {"out/result.txt": b"42\n", "model.choline-bundle.tar.gz": b"tarball"}
    req = pipeline.PresignRequest(attempt=1, purpose="artifact", files=list(files))
    reply = raise_for_error(await plane.box_request(run, pipeline.PRESIGN_METHOD, req)).event(pipeline.PresignReply)
    for name, data in files.items():
        await asyncio.to_thread(http_put, reply.urls[name], data)
    logs = raise_for_error(
        await plane.box_request(run, pipeline.PRESIGN_METHOD, pipeline.PresignRequest(attempt=1, purpose="logs"))
    ).event(pipeline.PresignReply)
    await asyncio.to_thread(http_put, logs.urls["attempt-1.txt"], b"hello\n")
    ev = ArtifactsUploaded(
        run_id=run,
        attempt=1,
        prefix=reply.prefix,
        files=[
            *(CheckpointFile(path=k, size=len(v), sha256=hashlib.sha256(v).hexdigest()) for k, v in files.items()),
            CheckpointFile(path="never-uploaded.txt", size=1, sha256="0" * 64),
        ],
        bundle=f"{reply.prefix}/model.choline-bundle.tar.gz",
    )
    await plane.bus.publish(plane.subjects.run_events(run), ev.envelope(run_id=run))

    async def listed() -> pipeline.ArtifactList | None:
        out = (await plane.rpc(pipeline.SYNCER_ARTIFACTS, pipeline.ArtifactsQuery(run_id=run))).event(
            pipeline.ArtifactList
        )
        return out if out.artifacts else None

    out = await eventually(listed, what="the artifacts")
    assert sorted(a.path for a in out.artifacts) == sorted(files)  # the one never uploaded is not recorded
    assert out.bundle == "model.choline-bundle.tar.gz"
    for a in out.artifacts:
        assert a.url is not None and await asyncio.to_thread(http_get, a.url) == files[a.path]
    assert [(li.attempt, li.size) for li in out.logs] == [(1, 6)]


@pytest.mark.postgres
async def test_syncer_on_postgres(
    nats_server: NatsServer, s3_server: WeedServer, store: S3Store, subjects: Subjects, bus: Bus, pg_url: str
) -> None:
    """The same service with its tables in a PostgreSQL schema: checkpoints, retention, artifacts."""
    settings = syncer_settings(nats_server, s3_server, store, subjects, pg_url)
    settings.syncer_keep = 1
    settings.syncer_best_metric = ""
    service = SyncerService(settings)
    service.db_name = f"t{uuid.uuid4().hex[:8]}syncer"
    try:
        async with running(service):
            plane = Plane(nats_server, s3_server, store, subjects, bus, service)
            run = new_run()
            for step in (1, 2, 3):
                await upload_checkpoint(plane, run, 1, step)
            assert service.engine is not None
            engine = service.engine

            def live_steps() -> list[int]:
                with engine.connect() as conn:
                    rows = conn.execute(
                        text(
                            "SELECT step FROM syncer_checkpoint WHERE run_id = :r AND deleted_at IS NULL ORDER BY step"
                        ),
                        {"r": run},
                    )
                    return [r[0] for r in rows]

            await eventually(lambda: live_steps() == [3], what="retention on PostgreSQL")
            assert store.read_manifest(pipeline.checkpoint_prefix(run, 1, 1)) is None
            assert [c.step for c in await checkpoints(plane, run, include_deleted=True)] == [1, 2, 3]
            # artifacts: recorded, then replaced by a later attempt's file of the same path
            for attempt, body in ((1, b"first"), (2, b"second!")):
                req = pipeline.PresignRequest(attempt=attempt, purpose="artifact", files=["out.txt"])
                reply = raise_for_error(await plane.box_request(run, pipeline.PRESIGN_METHOD, req)).event(
                    pipeline.PresignReply
                )
                await asyncio.to_thread(http_put, reply.urls["out.txt"], body)
                sha = hashlib.sha256(body).hexdigest()
                ev = ArtifactsUploaded(
                    run_id=run,
                    attempt=attempt,
                    prefix=reply.prefix,
                    files=[CheckpointFile(path="out.txt", size=len(body), sha256=sha)],
                )
                await bus.publish(subjects.run_events(run), ev.envelope(run_id=run))

                async def recorded(attempt: int = attempt, sha: str = sha) -> bool:
                    out = (await plane.rpc(pipeline.SYNCER_ARTIFACTS, pipeline.ArtifactsQuery(run_id=run))).event(
                        pipeline.ArtifactList
                    )
                    return [(a.path, a.attempt, a.sha256) for a in out.artifacts] == [("out.txt", attempt, sha)]

                await eventually(recorded, what=f"attempt {attempt}'s artifact on PostgreSQL")
    finally:
        admin = create_engine(pg_url)
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "choline_{service.db_name}" CASCADE'))
        admin.dispose()


def test_safe_names() -> None:
    assert safe_name("a/b.txt") == "a/b.txt"
    for bad in ("", "/a", "a/../b", "..", "a//b", "a\\b", "./a", "a\x00"):
        with pytest.raises(BadSpec):
            safe_name(bad)
