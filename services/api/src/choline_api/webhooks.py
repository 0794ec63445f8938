"""Webhooks: a user's endpoints, the events they want, signed deliveries retried until they land.

**Events** (``WebhookEvent``): ``run.started`` (first time running), ``run.recovered`` (running
again after a lost box), ``run.paused``, ``run.succeeded``, ``run.failed``, ``run.cancelled``,
``finding.raised`` (the monitor), ``deployment.ready`` (the deploy service), and ``ping`` (``POST
/v1/webhooks/{id}/test``, always delivered).

**Outbox**: when the gateway handles an event (the RUNS, FINDINGS and deploy consumers), it writes
one ``api_webhook_delivery`` row per subscribed endpoint *in the same transaction* as its read
model, unique on (webhook, event id): a redelivered message adds nothing, a crash loses nothing.
The body is rendered then, once, in the endpoint's format, so every try sends the same bytes.

**Worker** (``DeliveryWorker``, a task in the api process): claims due rows with a lease (several
replicas never send one row at once; a crashed sender's claim lapses), POSTs, records each try
in ``api_webhook_attempt``. 2xx: delivered. Network error, timeout, 408, 425, 429 or 5xx: retried
after ``backoff * 2**(tries-1)`` (capped, with jitter) until ``max_attempts``. Any other 4xx:
failed at once (the receiver refuses it; retrying cannot help). Delivery is at least once:
receivers dedupe on ``X-Choline-Event-Id``.

**Signature**: ``X-Choline-Timestamp: <unix seconds>`` and ``X-Choline-Signature: v1=<hex>`` where
hex = HMAC-SHA256(secret, ``<timestamp>.<body>``), computed at each try. ``verify()`` is the
reference check (docs/webhooks.md has a standalone copy).

Secrets: the signing secret (``whsec_...``) is shown once, at creation; it and the URL (a Slack or
Discord URL is itself a credential) are stored sealed with the gateway's key (``keys.SecretBox``).
Logs name an endpoint by its id and redacted URL only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import sqlalchemy as sa
from sqlmodel import Session, select

from choline_core.errors import BadSpec, NotFound

from .keys import SecretBox
from .models import (
    DeliveryAttemptRow,
    DeliveryPublic,
    DeliveryRow,
    DeliveryTryPublic,
    WebhookEvent,
    WebhookPublic,
    WebhookRow,
    aware,
    utcnow,
)

log = logging.getLogger(__name__)

PING = "ping"
SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
RETRY_STATUSES = frozenset({408, 425, 429})
USER_AGENT = "choline-webhooks/1"


# =============================================================================================
# Signing
# =============================================================================================
def signature(secret: str, timestamp: int, body: bytes) -> str:
    """``v1=<hex>``: HMAC-SHA256 over ``<timestamp>.`` followed by the body bytes."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"{SIGNATURE_VERSION}={mac}"


def verify(secret: str, timestamp: str, sig_header: str, body: bytes, *, tolerance_s: float = 300.0) -> bool:
    """What a receiver does: the timestamp is recent and one of the header's ``v1=`` values matches."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs(time.time() - ts) > tolerance_s:
        return False
    want = signature(secret, ts, body)
    return any(hmac.compare_digest(want, part.strip()) for part in sig_header.split(","))


# =============================================================================================
# Events and bodies
# =============================================================================================
def run_transition(state: str, *, ever_running: bool, recovering: bool) -> str | None:
    """The webhook event a run's new state stands for (None: not one users subscribe to)."""
    if state == "running":
        if recovering:
            return WebhookEvent.run_recovered.value
        return None if ever_running else WebhookEvent.run_started.value
    if state in ("paused", "succeeded", "failed", "cancelled"):
        return f"run.{state}"
    return None


def summary(event_type: str, data: dict[str, Any]) -> str:
    """One human line, for chat formats."""
    run = data.get("run_id")
    name = f" ({data['name']})" if data.get("name") else ""
    reason = f": {data['reason']}" if data.get("reason") else ""
    if event_type.startswith("run."):
        what = {"run.started": "started", "run.recovered": "recovered on a new box"}.get(event_type, event_type[4:])
        return f"choline: run {run}{name} {what}{reason}"
    if event_type == WebhookEvent.finding_raised.value:
        step = f" at step {data['step']}" if data.get("step") is not None else ""
        return f"choline: {data.get('severity', 'finding')} on run {run}{name}{step}: {data.get('message', '')}"
    if event_type == WebhookEvent.deployment_ready.value:
        where = f" at {data['url']}" if data.get("url") else ""
        return f"choline: deployment {data.get('name')} is ready{where}"
    return f"choline: {event_type} (webhook test)"


def render(fmt: str, event_id: str, event_type: str, created_at: datetime, data: dict[str, Any]) -> str:
    if fmt == "slack":
        return json.dumps({"text": summary(event_type, data)})
    if fmt == "discord":
        return json.dumps({"content": summary(event_type, data)})
    return json.dumps(
        {"id": event_id, "type": event_type, "created_at": created_at.isoformat(), "data": data}, default=str
    )


def display_url(url: str) -> str:
    """``scheme://host[:port]/first-segment/...``: enough to recognise, never the token in it."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    try:
        port = parts.port
    except ValueError:
        port = None
    if port:
        host = f"{host}:{port}"
    segs = [s for s in parts.path.split("/") if s]
    path = f"/{segs[0]}" if segs else "/"
    if len(segs) > 1 or parts.query:
        path += "/..." if segs else "..."
    return f"{parts.scheme}://{host}{path}"[:300]


def check_destination(url: str, *, allow_private: bool) -> None:
    """Refuse URLs that are not http(s) and, unless allowed, those that resolve to loopback,
    private, link-local or reserved addresses (a hosted gateway must not be a proxy into its LAN)."""
    try:
        parts = urlsplit(url)
        port = parts.port
        httpx.URL(url)  # what the sender will need to parse
        if not url.isprintable() or any(c.isspace() for c in url):
            raise ValueError("spaces or control characters")
    except (ValueError, httpx.InvalidURL) as exc:
        raise BadSpec(f"not a valid URL: {exc}", hint="e.g. https://hooks.example.com/choline") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadSpec("a webhook URL must be http(s)://host/...", hint="e.g. https://hooks.example.com/choline")
    if parts.username or parts.password:
        raise BadSpec("a webhook URL must not carry a user or password")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, port or (443 if parts.scheme == "https" else 80))
    except (OSError, UnicodeError) as exc:
        raise BadSpec(f"cannot resolve the webhook host {parts.hostname}: {exc}") from exc
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast:
            raise BadSpec(
                f"the webhook host {parts.hostname} resolves to a private address ({ip})",
                hint="this gateway only delivers to public addresses (CHOLINE_API_WEBHOOK_ALLOW_PRIVATE)",
            )


# =============================================================================================
# Store
# =============================================================================================
@dataclass
class Due:
    delivery_id: str
    webhook_id: str
    event_id: str
    event_type: str
    body: str
    attempts: int
    url_enc: str
    secret_enc: str
    url_display: str


class WebhookStore:
    def __init__(self, engine: sa.engine.Engine, box: SecretBox) -> None:
        self.engine = engine
        self.box = box

    # ------------------------------------------------------------------ endpoints
    def create(
        self, owner: str, url: str, events: Sequence[str], fmt: str, description: str | None
    ) -> tuple[WebhookRow, str]:
        from .store import new_id

        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        hook_id = new_id("w")
        row = WebhookRow(
            id=hook_id,
            owner=owner,
            url_enc=self.box.seal(url, hook_id + ":url"),
            url_display=display_url(url),
            secret_enc=self.box.seal(secret, hook_id + ":secret"),
            events=json.dumps(sorted(set(events))),
            format=fmt,
            description=description,
            created_at=utcnow(),
        )
        with Session(self.engine) as s:
            s.add(row)
            s.commit()
            s.refresh(row)
        return row, secret

    def get(self, owner: str | None, hook_id: str) -> WebhookRow:
        """An active webhook of ``owner`` (None: anyone's, for an admin); NotFound otherwise."""
        with Session(self.engine) as s:
            row = s.get(WebhookRow, hook_id)
        if row is None or row.deleted_at is not None or (owner is not None and row.owner != owner):
            raise NotFound(f"no webhook {hook_id}", hint="see 'choline webhooks ls'")
        return row

    def active(self, owner: str | None) -> list[WebhookRow]:
        with Session(self.engine) as s:
            q = select(WebhookRow).where(WebhookRow.deleted_at.is_(None))  # type: ignore[union-attr]
            if owner is not None:
                q = q.where(WebhookRow.owner == owner)
            return list(s.exec(q.order_by(WebhookRow.created_at)).all())  # type: ignore[arg-type]

    def counts(self, hook_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        if not hook_ids:
            return {}
        t = DeliveryRow.__table__  # type: ignore[attr-defined]
        q = sa.select(t.c.webhook_id, t.c.state, sa.func.count()).where(t.c.webhook_id.in_(list(hook_ids)))
        out: dict[str, dict[str, int]] = {h: {} for h in hook_ids}
        with self.engine.connect() as conn:
            for hook, state, n in conn.execute(q.group_by(t.c.webhook_id, t.c.state)):
                out[hook][state] = int(n)
        return out

    def public(self, rows: Sequence[WebhookRow]) -> list[WebhookPublic]:
        counts = self.counts([r.id for r in rows])
        return [
            WebhookPublic(
                id=r.id,
                owner=r.owner,
                url=r.url_display,
                events=[WebhookEvent(e) for e in json.loads(r.events)],
                format=r.format,  # type: ignore[arg-type]
                description=r.description,
                created_at=aware(r.created_at) or r.created_at,
                pending=counts[r.id].get("pending", 0),
                delivered=counts[r.id].get("delivered", 0),
                failed=counts[r.id].get("failed", 0),
            )
            for r in rows
        ]

    def delete(self, owner: str | None, hook_id: str) -> None:
        row = self.get(owner, hook_id)
        now = utcnow()
        d = DeliveryRow.__table__  # type: ignore[attr-defined]
        with Session(self.engine) as s:
            s.execute(sa.update(WebhookRow).where(WebhookRow.id == row.id).values(deleted_at=now))  # type: ignore[arg-type]
            s.execute(
                sa.update(d)
                .where(d.c.webhook_id == row.id, d.c.state == "pending")
                .values(state="cancelled", finished_at=now, next_at=None)
            )
            s.commit()

    def any_active(self) -> bool:
        with Session(self.engine) as s:
            q = select(WebhookRow.id).where(WebhookRow.deleted_at.is_(None)).limit(1)  # type: ignore[union-attr]
            return s.exec(q).first() is not None

    # ------------------------------------------------------------------ outbox
    def enqueue_in(
        self,
        s: Session,
        owner: str,
        event_type: str,
        event_id: str,
        created_at: datetime,
        data: dict[str, Any],
        only: str | None = None,
    ) -> int:
        """Add a delivery to each of ``owner``'s webhooks subscribed to ``event_type`` (``only``: to
        that one webhook), inside the caller's transaction. Returns how many were new."""
        from .store import new_id

        q = select(WebhookRow).where(WebhookRow.owner == owner, WebhookRow.deleted_at.is_(None))  # type: ignore[union-attr]
        if only is not None:
            q = q.where(WebhookRow.id == only)
        hooks = [h for h in s.exec(q).all() if only is not None or event_type in json.loads(h.events)]
        added = 0
        t = DeliveryRow.__table__  # type: ignore[attr-defined]
        for hook in hooks:
            exists = s.execute(sa.select(t.c.id).where(t.c.webhook_id == hook.id, t.c.event_id == event_id)).first()
            if exists is not None:
                continue
            s.add(
                DeliveryRow(
                    id=new_id("d"),
                    webhook_id=hook.id,
                    event_id=event_id,
                    event_type=event_type,
                    body=render(hook.format, event_id, event_type, created_at, data),
                    state="pending",
                    attempts=0,
                    next_at=utcnow(),
                    created_at=utcnow(),
                )
            )
            added += 1
        return added

    def enqueue(
        self,
        owner: str,
        event_type: str,
        event_id: str,
        created_at: datetime,
        data: dict[str, Any],
        only: str | None = None,
    ) -> int:
        with Session(self.engine) as s:
            added = self.enqueue_in(s, owner, event_type, event_id, created_at, data, only)
            s.commit()
        return added

    # ------------------------------------------------------------------ the worker's side
    def claim_due(self, limit: int, lease_s: float) -> list[Due]:
        now = utcnow()
        d = DeliveryRow.__table__  # type: ignore[attr-defined]
        w = WebhookRow.__table__  # type: ignore[attr-defined]
        q = (
            sa.select(d, w.c.url_enc, w.c.secret_enc, w.c.url_display)
            .join(w, w.c.id == d.c.webhook_id)
            .where(
                d.c.state == "pending",
                d.c.next_at <= now,
                sa.or_(d.c.claimed_until.is_(None), d.c.claimed_until < now),
                w.c.deleted_at.is_(None),
            )
            .order_by(d.c.next_at)
            .limit(limit)
        )
        claimed: list[Due] = []
        with self.engine.begin() as conn:
            for r in conn.execute(q).mappings().all():
                got = conn.execute(
                    sa.update(d)
                    .where(
                        d.c.id == r["id"],
                        d.c.state == "pending",
                        sa.or_(d.c.claimed_until.is_(None), d.c.claimed_until < now),
                    )
                    .values(claimed_until=now + timedelta(seconds=lease_s))
                )
                if got.rowcount == 1:
                    claimed.append(
                        Due(
                            r["id"],
                            r["webhook_id"],
                            r["event_id"],
                            r["event_type"],
                            r["body"],
                            r["attempts"],
                            r["url_enc"],
                            r["secret_enc"],
                            r["url_display"],
                        )
                    )
        return claimed

    def record(
        self,
        due: Due,
        *,
        status: int | None,
        error: str | None,
        duration_ms: int,
        outcome: str,
        next_at: datetime | None = None,
    ) -> None:
        """One try's result; ``outcome``: delivered | pending (retry at ``next_at``) | failed."""
        now = utcnow()
        n = due.attempts + 1
        d = DeliveryRow.__table__  # type: ignore[attr-defined]
        with Session(self.engine) as s:
            s.add(
                DeliveryAttemptRow(
                    delivery_id=due.delivery_id,
                    n=n,
                    at=now,
                    status=status,
                    error=error[:300] if error else None,
                    duration_ms=duration_ms,
                )
            )
            s.execute(
                sa.update(d)
                .where(d.c.id == due.delivery_id, d.c.state == "pending")
                .values(
                    attempts=n,
                    state=outcome,
                    last_status=status,
                    last_error=error[:300] if error else None,
                    next_at=next_at if outcome == "pending" else None,
                    claimed_until=None,
                    finished_at=None if outcome == "pending" else now,
                )
            )
            s.commit()

    def next_due(self) -> datetime | None:
        d = DeliveryRow.__table__  # type: ignore[attr-defined]
        with self.engine.connect() as conn:
            found = conn.execute(sa.select(sa.func.min(d.c.next_at)).where(d.c.state == "pending")).scalar()
        return aware(found)

    def deliveries(self, owner: str | None, hook_id: str, limit: int) -> list[DeliveryPublic]:
        self.get(owner, hook_id)
        d = DeliveryRow.__table__  # type: ignore[attr-defined]
        a = DeliveryAttemptRow.__table__  # type: ignore[attr-defined]
        with self.engine.connect() as conn:
            rows = (
                conn.execute(
                    sa.select(d).where(d.c.webhook_id == hook_id).order_by(d.c.created_at.desc(), d.c.id).limit(limit)
                )
                .mappings()
                .all()
            )
            ids = [r["id"] for r in rows]
            tries: dict[str, list[DeliveryTryPublic]] = {i: [] for i in ids}
            if ids:
                for t in conn.execute(sa.select(a).where(a.c.delivery_id.in_(ids)).order_by(a.c.n)).mappings():
                    tries[t["delivery_id"]].append(
                        DeliveryTryPublic(
                            n=t["n"],
                            at=aware(t["at"]) or t["at"],
                            status=t["status"],
                            error=t["error"],
                            duration_ms=t["duration_ms"],
                        )
                    )
        return [
            DeliveryPublic(
                id=r["id"],
                event_id=r["event_id"],
                event_type=r["event_type"],
                state=r["state"],
                attempts=r["attempts"],
                next_at=aware(r["next_at"]),
                last_status=r["last_status"],
                last_error=r["last_error"],
                created_at=aware(r["created_at"]) or r["created_at"],
                finished_at=aware(r["finished_at"]),
                tries=tries[r["id"]],
            )
            for r in rows
        ]


# =============================================================================================
# Worker
# =============================================================================================
@dataclass
class WorkerConfig:
    timeout_s: float = 10.0
    backoff_s: float = 10.0
    backoff_max_s: float = 3600.0
    max_attempts: int = 12
    concurrency: int = 8
    poll_s: float = 2.0
    allow_private: bool = True


class DeliveryWorker:
    """Sends due deliveries; ``wake()`` after enqueueing to skip the poll wait."""

    def __init__(self, store: WebhookStore, config: WorkerConfig, *, now: Callable[[], float] = time.time) -> None:
        self.store = store
        self.config = config
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self.sent = 0

    def start(self) -> None:
        self._client = httpx.AsyncClient(
            timeout=self.config.timeout_s, follow_redirects=False, headers={"User-Agent": USER_AGENT}
        )
        self._task = asyncio.create_task(self._loop(), name="webhook-deliveries")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, self.config.timeout_s + 2)
            except asyncio.TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self._client is not None:
            await self._client.aclose()

    async def _loop(self) -> None:
        lease = self.config.timeout_s + 5.0
        while not self._stop.is_set():
            self._wake.clear()
            try:
                due = await asyncio.to_thread(self.store.claim_due, self.config.concurrency, lease)
            except Exception:
                log.exception("webhook deliveries: cannot read the outbox")
                due = []
            if due:
                await asyncio.gather(*(self._send(d) for d in due))
                continue
            wait = self.config.poll_s
            with contextlib.suppress(Exception):
                nxt = await asyncio.to_thread(self.store.next_due)
                if nxt is not None:
                    wait = max(0.01, min(wait, (nxt - utcnow()).total_seconds()))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _send(self, due: Due) -> None:
        assert self._client is not None
        t0 = time.monotonic()
        status: int | None = None
        error: str | None = None
        permanent = False
        try:
            url = self.store.box.open(due.url_enc, due.webhook_id + ":url")
            secret = self.store.box.open(due.secret_enc, due.webhook_id + ":secret")
        except ValueError:
            error, permanent = "the webhook's URL or secret does not decrypt with this gateway's key", True
        else:
            try:
                if not self.config.allow_private:
                    await asyncio.to_thread(check_destination, url, allow_private=False)
                body = due.body.encode()
                ts = int(time.time())
                headers = {
                    "Content-Type": "application/json",
                    "X-Choline-Event": due.event_type,
                    "X-Choline-Event-Id": due.event_id,
                    "X-Choline-Delivery": due.delivery_id,
                    "X-Choline-Timestamp": str(ts),
                    "X-Choline-Signature": signature(secret, ts, body),
                }
                resp = await self._client.post(url, content=body, headers=headers)
                status = resp.status_code
                if not 200 <= status < 300:
                    error = f"HTTP {status}"
                    permanent = 400 <= status < 500 and status not in RETRY_STATUSES
            except BadSpec as exc:
                error, permanent = exc.message, True
            except httpx.TimeoutException:
                error = f"no answer in {self.config.timeout_s:g}s"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {str(exc).replace(url, due.url_display)[:200]}"
        ms = int((time.monotonic() - t0) * 1000)
        tries = due.attempts + 1
        if error is None:
            outcome, next_at = "delivered", None
            self.sent += 1
        elif permanent or tries >= self.config.max_attempts:
            outcome, next_at = "failed", None
        else:
            delay = min(self.config.backoff_s * 2 ** (tries - 1), self.config.backoff_max_s)
            outcome, next_at = "pending", utcnow() + timedelta(seconds=delay * (1 + random.random() * 0.2))
        level = logging.INFO if outcome != "pending" else logging.WARNING
        log.log(
            level,
            "webhook %s (%s) %s %s: try %d %s%s",
            due.webhook_id,
            due.url_display,
            due.event_type,
            due.event_id,
            tries,
            outcome,
            f" ({error})" if error else "",
        )
        try:
            await asyncio.to_thread(
                self.store.record, due, status=status, error=error, duration_ms=ms, outcome=outcome, next_at=next_at
            )
        except Exception:
            log.exception("webhook %s: cannot record try %d (the claim lapses; it is retried)", due.webhook_id, tries)
