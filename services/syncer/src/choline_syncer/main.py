"""The syncer service process: ``python -m choline_syncer``.

Owns checkpoints, artifacts and the boxes' S3 endpoints (``syncer_*`` tables). See ``handlers`` for what
each message does.

- box requests: ``<p>.runs.*.req.presign`` and ``<p>.runs.*.req.resume`` (core NATS, queue ``syncer``);
- run events: durable consumer ``syncer-runs`` on ``<p>.runs.*.events``;
- gateway/CLI: ``<p>.rpc.syncer.upload|checkpoints|artifacts`` and the ``dataset_*`` methods (core NATS,
  queue ``syncer``; see ``datasets``), and the ``model*`` methods (``model_registry``);
- run events again: durable consumer ``syncer-models`` registers a successful run's bundle as a model version.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from sqlalchemy import text
from sqlalchemy.engine import Engine

from choline_core import deploy as model_contracts
from choline_core import pipeline
from choline_core.errors import CholineError
from choline_core.events import Envelope
from choline_core.settings import CholineSettings
from choline_core.storage import S3Store
from choline_svc.db import database_url, make_engine, migrate
from choline_svc.service import Service

from .dataset_store import DatasetStore
from .datasets import Datasets
from .handlers import Syncer
from .model_registry import ModelStore, Registry
from .settings import SyncerSettings
from .store import SyncerStore

log = logging.getLogger(__name__)

QUEUE = "syncer"
DURABLE_RUNS = "syncer-runs"
DURABLE_MODELS = "syncer-models"  # run events -> a successful run's bundle becomes a model version

SubjectHandler = Callable[[str, Envelope], Awaitable[Envelope]]


class SyncerService(Service):
    name = "syncer"
    settings_cls = SyncerSettings
    settings: SyncerSettings
    #: the database's service name: the SQLite file ``db/<db_name>.sqlite`` or the PostgreSQL schema
    #: ``choline_<db_name>`` (tests give each service their own)
    db_name = "syncer"

    def __init__(self, settings: CholineSettings | None = None) -> None:
        if settings is not None and not isinstance(settings, SyncerSettings):
            settings = SyncerSettings(**settings.model_dump())
        super().__init__(settings)
        self.engine: Engine | None = None
        self.syncer: Syncer | None = None
        self._subs: list[object] = []
        self._s3_ok = False
        self._s3_probe: asyncio.Task[None] | None = None

    async def start(self) -> None:
        assert self.bus is not None
        s, sub = self.settings, self.subjects
        self.engine = make_engine(database_url(s, self.db_name), self.db_name)
        await asyncio.to_thread(migrate, self.engine, "choline_syncer.migrations")
        objects = S3Store.from_settings(s)
        await asyncio.to_thread(objects.ensure_bucket)
        self.syncer = syncer = Syncer(SyncerStore(self.engine), objects, s)
        self._s3_ok = True
        self._s3_probe = asyncio.create_task(self._probe_s3(objects), name="syncer-s3-probe")
        await self.serve_run_requests(pipeline.PRESIGN_METHOD, syncer.presign)
        await self.serve_run_requests(pipeline.RESUME_METHOD, syncer.resume)
        await self.bus.serve(
            sub.rpc(QUEUE, pipeline.SYNCER_UPLOAD), self.timed("upload", syncer.rpc_upload), queue=QUEUE
        )
        await self.bus.serve(
            sub.rpc(QUEUE, pipeline.SYNCER_CHECKPOINTS), self.timed("checkpoints", syncer.rpc_checkpoints), queue=QUEUE
        )
        await self.bus.serve(
            sub.rpc(QUEUE, pipeline.SYNCER_ARTIFACTS), self.timed("artifacts", syncer.rpc_artifacts), queue=QUEUE
        )
        datasets = syncer.datasets = Datasets(syncer, DatasetStore(self.engine))
        for method, handler in (
            (pipeline.SYNCER_DATASET_CHUNKS, datasets.rpc_chunks),
            (pipeline.SYNCER_DATASET_UPLOAD, datasets.rpc_upload),
            (pipeline.SYNCER_DATASETS, datasets.rpc_list),
            (pipeline.SYNCER_DATASET_URLS, datasets.rpc_urls),
        ):
            await self.bus.serve(sub.rpc(QUEUE, method), self.timed(method, handler), queue=QUEUE)
        # registering reads whole packs back and committing HEADs every pack: many at once, not one by one
        await self.serve_concurrent(pipeline.SYNCER_DATASET_REGISTER, datasets.rpc_register, limit=4)
        await self.serve_concurrent(pipeline.SYNCER_DATASET_COMMIT, datasets.rpc_commit, limit=4)
        # bad events are rejected by the handler; anything else (S3 or the database away) is retried with
        # backoff for as long as it takes, so an outage loses no checkpoint record
        await self.consume(DURABLE_RUNS, sub.all_run_events(), syncer.on_run_event, max_deliver=-1)
        # model versions (model_registry): the model RPCs, and successful runs' bundles registered
        models = Registry(ModelStore(self.engine), objects, syncer.public_signer, self.bus, sub)
        for method, handler in (
            (model_contracts.MODELS, models.rpc_models),
            (model_contracts.MODEL_GET, models.rpc_get),
            (model_contracts.MODEL_UPLOAD, models.rpc_upload),
        ):
            await self.bus.serve(sub.rpc(QUEUE, method), self.timed(method, handler), queue=QUEUE)
        await self.serve_concurrent(model_contracts.MODEL_REGISTER, models.rpc_register, limit=2)
        await self.consume(DURABLE_MODELS, sub.all_run_events(), models.on_run_event, max_deliver=-1)

    async def serve_run_requests(self, method: str, handler: SubjectHandler) -> None:
        """Like ``Bus.serve`` (same error replies), but the handler gets the subject: the run id is taken from
        it, since a box's credentials let it publish only under its own run."""
        assert self.bus is not None
        timed = self.timed(method, handler)

        async def on_msg(msg: Msg) -> None:
            try:
                env = Envelope.parse(msg.data)
                body = (await timed(msg.subject, env)).to_bytes()
            except Exception as exc:
                err = exc if isinstance(exc, CholineError) else None
                if err is None:
                    if isinstance(exc, ValueError):
                        err_body = {"type": "bad_spec", "message": str(exc), "detail": None}
                    else:
                        log.exception("%s request on %s failed", method, msg.subject)
                        err_body = {"type": "bug", "message": f"{type(exc).__name__}: {exc}", "detail": None}
                else:
                    err_body = err.to_body()
                body = Envelope(type="error", data=err_body).to_bytes()
            if msg.reply:
                await msg.respond(body)

        self._subs.append(await self.bus.nc.subscribe(self.subjects.all_run_requests(method), queue=QUEUE, cb=on_msg))

    async def serve_concurrent(
        self, method: str, handler: Callable[[Envelope], Awaitable[Envelope]], *, limit: int
    ) -> None:
        """Like ``Bus.serve``, but up to ``limit`` requests are handled at once (nats-py runs one
        subscription's callbacks one after another)."""
        assert self.bus is not None
        timed = self.timed(method, handler)
        slots = asyncio.Semaphore(limit)
        tasks: set[asyncio.Task[None]] = set()

        async def handle(msg: Msg) -> None:
            async with slots:
                try:
                    body = (await timed(Envelope.parse(msg.data))).to_bytes()
                except Exception as exc:
                    if isinstance(exc, CholineError):
                        err_body = exc.to_body()
                    else:
                        log.exception("%s request failed", method)
                        err_body = {"type": "bug", "message": f"{type(exc).__name__}: {exc}", "detail": None}
                    body = Envelope(type="error", data=err_body).to_bytes()
                if msg.reply:
                    await msg.respond(body)

        async def on_msg(msg: Msg) -> None:
            task = asyncio.create_task(handle(msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        self._subs.append(await self.bus.nc.subscribe(self.subjects.rpc(QUEUE, method), queue=QUEUE, cb=on_msg))

    async def _probe_s3(self, objects: S3Store) -> None:
        """``/healthz`` must not block the event loop on a dead S3: probe in a thread, every few seconds."""
        while True:
            await asyncio.sleep(5.0)
            self._s3_ok = await asyncio.to_thread(objects.healthy)

    async def stop(self) -> None:
        if self._s3_probe is not None:
            self._s3_probe.cancel()
        if self.engine is not None:
            self.engine.dispose()

    def checks(self) -> dict[str, bool]:
        checks = super().checks()
        ok = False
        if self.engine is not None:
            try:
                with self.engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                ok = True
            except Exception:
                ok = False
        checks["database"] = ok
        checks["s3"] = self._s3_ok
        return checks
