"""The api service process (the gateway): ``python -m choline_api --health-port P``.

One process, one event loop: uvicorn serves the FastAPI app on the service's port (which also
answers ``/healthz`` and ``/metrics``) beside the NATS connection and these consumers:

- ``api-logs``     ``<p>.runs.*.logs``     log batches  -> ``api_log_line`` (batched)
- ``api-metrics``  ``<p>.runs.*.metrics``  metric batches -> ``api_metric_point`` (batched)
- ``api-runs``     ``<p>.runs.*.events``   run states -> ``api_run_state`` (+ webhook outbox);
                                           attempt starts -> superseded points, rollups rebuilt
- ``api-findings`` ``<p>.monitor.findings`` monitor findings -> webhook outbox
- ``api-deploy``   ``<p>.deploy.changed``  deployments ready -> webhook outbox

and the webhook delivery worker (``webhooks.DeliveryWorker``).

At the first start (no user yet) it creates the ``admin`` user and a token, written 0600 to
``$CHOLINE_HOME/secrets/token.json`` as ``{"api_token": ...}`` where the CLI finds it
(``CHOLINE_ADMIN_TOKEN`` chooses the token instead, for a hosted control plane).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from sqlalchemy.engine import Engine

from choline_core.events import Envelope
from choline_core.logs import register_secret
from choline_core.settings import CholineSettings, write_private
from choline_svc.db import database_url, make_engine, migrate
from choline_svc.service import Service

from .gateway import Gateway
from .ingest import BatchConsumer, Ingester, MetricsMessage, Notifier
from .keys import SecretBox, StreamTokens, load_or_create_master_key
from .metrics import MetricStore
from .settings import TOKEN_FILE, ApiSettings
from .store import ApiStore
from .webhooks import DeliveryWorker, WebhookStore, WorkerConfig

log = logging.getLogger(__name__)

DURABLE_LOGS = "api-logs"
DURABLE_METRICS = "api-metrics"
DURABLE_RUNS = "api-runs"
DURABLE_FINDINGS = "api-findings"
DURABLE_DEPLOY = "api-deploy"
DEPLOY_CHANGED = "changed"  # <p>.deploy.changed: DeploymentChanged events from the deploy service


class ApiService(Service):
    name = "api"
    settings_cls = ApiSettings
    settings: ApiSettings

    def __init__(self, settings: CholineSettings | None = None, *, engine: Engine | None = None) -> None:
        if settings is not None and not isinstance(settings, ApiSettings):
            settings = ApiSettings(**settings.model_dump())
        super().__init__(settings)
        self.engine = engine
        self.store: ApiStore | None = None
        self.gateway: Gateway | None = None
        self.notifier = Notifier()
        self.ingester: Ingester | None = None
        self.stopping = asyncio.Event()
        self._batch_consumers: list[BatchConsumer] = []
        self._app: Any = None
        self.worker: DeliveryWorker | None = None

    def http_app(self) -> Any:
        if self._app is None:
            from .app import create_app

            self._app = create_app(self)
        return self._app

    async def start(self) -> None:
        assert self.bus is not None
        if self.engine is None:
            self.engine = make_engine(database_url(self.settings, "api"), "api")
        await asyncio.to_thread(migrate, self.engine, "choline_api.migrations")
        store = self.store = ApiStore(self.engine)
        await asyncio.to_thread(self.bootstrap_admin)
        cfg = self.settings
        master = await asyncio.to_thread(load_or_create_master_key, cfg.secret("api_secret_key"), cfg.home)
        webhooks = WebhookStore(self.engine, SecretBox(master))
        self.worker = DeliveryWorker(
            webhooks,
            WorkerConfig(
                timeout_s=cfg.api_webhook_timeout_s,
                backoff_s=cfg.api_webhook_backoff_s,
                backoff_max_s=cfg.api_webhook_backoff_max_s,
                max_attempts=cfg.api_webhook_max_attempts,
                poll_s=cfg.api_webhook_poll_s,
                allow_private=cfg.api_webhook_allow_private,
            ),
        )
        metrics = MetricStore(self.engine)
        self.ingester = Ingester(store, metrics, self.subjects, self.notifier)
        self.gateway = Gateway(
            store,
            self.bus,
            cfg,
            self.notifier,
            self.stopping,
            metrics=metrics,
            webhooks=webhooks,
            worker=self.worker,
            stream_tokens=StreamTokens(master),
        )
        self.worker.start()
        s = self.subjects
        batch = cfg.api_ingest_batch
        for durable, subject, handler, size, parse in (
            (DURABLE_LOGS, s.all_run_logs(), self.ingester.handle_logs, batch, Envelope.parse),
            (DURABLE_METRICS, s.all_run_metrics(), self.ingester.handle_metrics, batch, MetricsMessage.parse),
            (DURABLE_RUNS, s.all_run_events(), self.gateway.handle_run_events, 64, Envelope.parse),
            (DURABLE_FINDINGS, s.monitor_findings(), self.gateway.handle_findings, 64, Envelope.parse),
            (DURABLE_DEPLOY, s.deploy(DEPLOY_CHANGED), self.gateway.handle_deployments, 64, Envelope.parse),
        ):
            stream = s.stream_for(subject.replace("*", "x"))
            bc = BatchConsumer(
                self.bus, stream, durable, subject, self.timed(durable, handler), batch=size, parse=parse
            )
            self.track(stream, durable, await bc.start())
            self._batch_consumers.append(bc)

    def bootstrap_admin(self) -> None:
        """First start: the admin user and its token, written where the CLI looks for it."""
        assert self.store is not None
        wanted = self.settings.secret("admin_token")
        token = self.store.bootstrap_admin(wanted)
        if token is None:
            return
        register_secret(token)
        if wanted:
            log.info("created the admin user with the token from CHOLINE_ADMIN_TOKEN")
            return
        path = self.settings.path(TOKEN_FILE)
        write_private(path, json.dumps({"api_token": token}))
        log.info("created the admin user; its token is in %s (0600)", path)

    async def stop(self) -> None:
        self.stopping.set()
        self.notifier.wake_all()
        await asyncio.gather(*(bc.stop() for bc in self._batch_consumers))
        if self.worker is not None:
            await self.worker.stop()
        self.gateway = None
        if self.engine is not None:
            self.engine.dispose()

    def checks(self) -> dict[str, bool]:
        checks = super().checks()
        checks["database"] = self.store is not None and self.store.ping()
        return checks
