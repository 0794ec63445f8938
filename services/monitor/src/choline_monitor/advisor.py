"""The advisor: explains a bad run and proposes a fix, through any OpenAI-compatible model.

When it asks:

- for a published finding of at least ``advisor_min_severity`` (a crash included: its traceback
  is in the finding), on its own, at most ``advisor_auto_per_hour`` times per run per hour (more
  are stored as ``rate_limited``, so the page can say why there is no answer);
- on demand (``choline advise RUN``, ``POST /v1/runs/{id}/advise``), for any run, running or
  finished: "what should I try next?"; at most ``advisor_asks_per_hour`` per run per hour.

How: the advice row is stored ``pending`` first (the finding's advice has a deterministic id, so
it is asked once), then a background task (at most ``advisor_concurrency`` at once) takes the
row's lease, gathers the run (``sources.py``), condenses it within ``advisor_context_tokens``
(``context.py``, secrets scrubbed), stores that context, asks the model, validates the answer
(``choline_core.advice.parse_answer``) and stores it with a guarded update. A monitor that
stops mid-way leaves the row pending; the lease expires and the sweep asks again.

It degrades, never fails: with no model configured, on a timeout, a refused request or an
answer that does not validate, the stored answer is the detector's own message (``source:
detector``) with the reason in ``error``. Nothing here raises into the monitor's handlers.

Settings (``CHOLINE_`` prefix): ``LLM_BASE_URL``, ``LLM_MODEL``, ``LLM_API_KEY`` (a secret: never
logged, never stored), ``LLM_TIMEOUT_S``, ``LLM_JSON_MODE`` (auto | on | off),
``ADVISOR_CONTEXT_TOKENS``, ``ADVISOR_AUTO_PER_HOUR``, ``ADVISOR_ASKS_PER_HOUR``,
``ADVISOR_MIN_SEVERITY``, ``ADVISOR_CONCURRENCY``; the actions' ``MONITOR_POLICY``,
``MONITOR_PAUSE_ON``, ``MONITOR_PAUSE_MAX_AGE_S`` (see ``actions.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, SecretStr

from choline_core.advice import AdviceAnswer, AdviceInfo, parse_answer
from choline_core.logs import redact
from choline_core.settings import CholineSettings

from .advice_store import AdviceRow, AdviceStore, advice_id, since
from .config import SEVERITY_RANK
from .context import DEFAULT_BUDGET, build_context
from .llm import ChatModel, LlmUnavailable, OpenAIChat
from .models import FindingPublic, utcnow
from .sources import Sources
from .watch import Finding

log = logging.getLogger(__name__)


class AdvisorSettings(CholineSettings):
    """The advisor's and the actions' settings (the monitor's settings class inherits them)."""

    llm_base_url: str | None = None
    llm_model: str | None = None
    llm_api_key: SecretStr | None = None
    llm_timeout_s: float = Field(60.0, gt=0)
    llm_json_mode: Literal["auto", "on", "off"] = "auto"
    llm_max_answer_tokens: int = Field(1500, ge=100)
    advisor_context_tokens: int = Field(DEFAULT_BUDGET, ge=1500)
    advisor_auto_per_hour: int = Field(3, ge=0)
    advisor_asks_per_hour: int = Field(10, ge=0)
    advisor_min_severity: Literal["info", "warning", "critical"] = "warning"
    advisor_concurrency: int = Field(2, ge=1)
    monitor_policy: Literal["notify", "auto-pause"] = "notify"
    monitor_pause_on: list[str] = Field(default_factory=lambda: ["nan", "divergence"])
    monitor_pause_max_age_s: float = Field(900.0, gt=0)

    def llm_configured(self) -> bool:
        return bool(self.llm_model and (self.llm_base_url or self.llm_api_key))

    def chat_model(self) -> ChatModel | None:
        if not self.llm_configured():
            return None
        assert self.llm_model is not None
        return OpenAIChat(
            self.llm_model,
            base_url=self.llm_base_url,
            api_key=self.llm_api_key,
            timeout=self.llm_timeout_s,
            json_mode=self.llm_json_mode,
        )


NO_MODEL = "no language model is configured (set CHOLINE_LLM_BASE_URL and CHOLINE_LLM_MODEL, see docs/advisor.md)"

HINTS: dict[str, list[str]] = {
    "nan": [
        "a learning rate too high for the model and batch size",
        "a log, sqrt or division of zero or a negative number in the loss",
        "mixed precision overflowing without a gradient scaler",
        "NaN or inf values in the input data",
    ],
    "divergence": [
        "a learning rate too high for the optimizer and batch size",
        "no gradient clipping",
        "a warm-up too short (or none)",
        "a corrupted batch (inputs or labels)",
    ],
    "spike": ["an outlier batch", "a learning rate at the edge of stability", "no gradient clipping"],
    "plateau": [
        "a learning rate far too low",
        "parameters not given to the optimizer, or frozen",
        "optimizer.zero_grad() or step() in the wrong place",
        "labels shuffled apart from their inputs",
    ],
    "overfit": [
        "a model too large for the amount of data",
        "too little regularization (dropout, weight decay, augmentation)",
        "training past the best validation loss: keep that checkpoint",
    ],
    "stall": ["a hung data-loader worker", "a deadlock in distributed communication", "waiting on slow storage"],
    "throughput": ["another tenant on a shared machine", "thermal throttling", "data loading slowing down"],
    "gpu_util": [
        "an input-pipeline bottleneck: more DataLoader workers, pin_memory, prefetching",
        "a batch too small for the GPU",
        "CPU-bound preprocessing",
    ],
    "crash": ["the traceback's last line names the error", "a kill by signal 9 is often the out-of-memory killer"],
}


def detector_answer(
    finding: dict[str, Any] | None, findings: list[dict[str, Any]], pause_on: list[str]
) -> AdviceAnswer:
    """The advice without a model: the detector's own message, its usual causes, no fix."""
    if finding:
        action = (
            "pause" if finding.get("severity") == "critical" and finding.get("detector") in pause_on else "investigate"
        )
        return AdviceAnswer(
            diagnosis=str(finding.get("message") or "the monitor raised a finding"),
            likely_causes=HINTS.get(str(finding.get("detector")), []),
            confidence=0.0,
            recommended_action=action,  # type: ignore[arg-type]
        )
    if findings:
        lines = [f"{f.get('detector')} at step {f.get('step')}: {f.get('message')}" for f in findings[-5:]]
        return AdviceAnswer(
            diagnosis="The monitor's findings for this run: " + "; ".join(lines),
            likely_causes=[c for f in findings[-3:] for c in HINTS.get(str(f.get("detector")), [])[:2]],
            confidence=0.0,
            recommended_action="investigate",
        )
    return AdviceAnswer(
        diagnosis="The monitor found nothing wrong with this run.", confidence=0.0, recommended_action="investigate"
    )


class Advisor:
    def __init__(
        self,
        store: AdviceStore,
        sources: Sources,
        model: ChatModel | None,
        settings: AdvisorSettings,
        findings: Callable[[str], list[FindingPublic]],
    ) -> None:
        self.store = store
        self.sources = sources
        self.model = model
        self.settings = settings
        self.findings = findings  # run id -> its findings (the monitor's own store)
        self._sem = asyncio.Semaphore(settings.advisor_concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self.lease_s = settings.llm_timeout_s + 2 * (sources.rpc_timeout + sources.read_timeout) + 30
        self.answered = 0
        self.degraded = 0

    # ------------------------------------------------------------------ triggers
    async def on_finding(self, f: Finding) -> None:
        """Ask about a published finding when it deserves it (never raises)."""
        try:
            if self.model is None:
                return  # without a model the finding's own message is the whole story
            if SEVERITY_RANK[f.severity] < SEVERITY_RANK[self.settings.advisor_min_severity]:
                return
            aid = advice_id(f.id)
            if await asyncio.to_thread(self.store.get, aid) is not None:
                return
            status = "pending"
            error = None
            limit = self.settings.advisor_auto_per_hour
            used = await asyncio.to_thread(self.store.count_since, f.run_id, since(1), on_demand=False)
            if used >= limit:
                status, error = "rate_limited", f"the advisor answers {limit} findings per run per hour"
            row = AdviceRow(
                id=aid,
                run_id=f.run_id,
                finding_id=f.id,
                trigger="crash" if f.detector == "crash" else "finding",
                status=status,
                error=error,
                created_at=utcnow(),
            )
            if await asyncio.to_thread(self.store.add, row) and status == "pending":
                self._spawn(aid)
        except Exception:
            log.exception("advisor: could not take up finding %s of %s", f.id, f.run_id)

    async def ask(self, run_id: str, question: str | None, finding_id: str | None, by: str | None) -> AdviceInfo:
        """An on-demand question: the new advice (pending), or why not (rate limited)."""
        question = (question or "").strip() or None
        if finding_id:
            found = [x for x in await asyncio.to_thread(self.findings, run_id) if x.id == finding_id]
            if not found:
                from choline_core.errors import NotFound

                raise NotFound(f"run {run_id} has no finding {finding_id}", hint=f"'choline advise {run_id}'")
        same = await asyncio.to_thread(self.store.pending_on_demand, run_id, question)
        if same is not None:
            return same.public()
        limit = self.settings.advisor_asks_per_hour
        used = await asyncio.to_thread(self.store.count_since, run_id, since(1), on_demand=True)
        if used >= limit:
            return AdviceInfo(
                id="",
                run_id=run_id,
                trigger="on_demand",
                question=question,
                status="rate_limited",
                error=f"the advisor answers {limit} questions per run per hour; ask again later",
                created_at=utcnow(),
            )
        row = AdviceRow(
            id=uuid.uuid4().hex,
            run_id=run_id,
            finding_id=finding_id,
            trigger="on_demand",
            question=question,
            by=by,
            status="pending",
            created_at=utcnow(),
        )
        await asyncio.to_thread(self.store.add, row)
        self._spawn(row.id)
        return row.public()

    async def resume_pending(self) -> int:
        """Ask again for pending advice nobody holds (after a restart, or a worker that died)."""
        ids = await asyncio.to_thread(self.store.claimable, utcnow())
        running = {t.get_name() for t in self._tasks}
        n = 0
        for aid in ids:
            if f"advice:{aid}" not in running:
                self._spawn(aid)
                n += 1
        return n

    def _spawn(self, aid: str) -> None:
        task = asyncio.create_task(self._answer(aid), name=f"advice:{aid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait for the advice in progress (tests, and a draining stop)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.model is not None:
            with contextlib.suppress(Exception):
                await self.model.close()

    # ------------------------------------------------------------------ answering
    async def _answer(self, aid: str) -> None:
        async with self._sem:
            try:
                await self._answer_claimed(aid)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug or the database away: the lease expires and the sweep retries
                log.exception("advisor: advice %s failed", aid)

    async def _answer_claimed(self, aid: str) -> None:
        row = await asyncio.to_thread(self.store.claim, aid, self.lease_s)
        if row is None:
            return
        t0 = time.monotonic()
        extra = {"run_id": row.run_id, "msg_id": aid}
        all_findings = [f.model_dump(mode="json") for f in await asyncio.to_thread(self.findings, row.run_id)]
        finding = next((f for f in all_findings if f["id"] == row.finding_id), None) if row.finding_id else None
        fallback = detector_answer(finding, all_findings, self.settings.monitor_pause_on)
        if self.model is None:
            await self._finish(aid, "degraded", "detector", fallback, NO_MODEL, None, t0)
            return
        material = await self.sources.gather(row.run_id, question=row.question, finding=finding, findings=all_findings)
        ctx = build_context(material, budget=self.settings.advisor_context_tokens)
        await asyncio.to_thread(self.store.save_context, aid, ctx.text, ctx.tokens)
        log.info(
            "advisor: asking %s about %s (%d tokens, sections: %s)",
            self.model.name,
            row.run_id,
            ctx.tokens,
            ", ".join(ctx.sections),
            extra=extra,
        )
        try:
            done = await asyncio.wait_for(
                self.model.complete(ctx.system, ctx.text, max_tokens=self.settings.llm_max_answer_tokens),
                timeout=self.settings.llm_timeout_s + 5,
            )
        except (LlmUnavailable, asyncio.TimeoutError) as exc:
            reason = str(exc) or f"no answer from the model within {self.settings.llm_timeout_s:g}s"
            await self._finish(aid, "degraded", "detector", fallback, reason, self.model.name, t0)
            return
        try:
            answer = parse_answer(done.text)
        except ValueError as exc:
            reason = f"the model's answer was not usable: {exc}"
            await self._finish(aid, "degraded", "detector", fallback, reason, done.model, t0)
            return
        await self._finish(aid, "answered", "llm", answer, None, done.model, t0)

    async def _finish(
        self,
        aid: str,
        status: str,
        source: str,
        answer: AdviceAnswer,
        error: str | None,
        model: str | None,
        t0: float,
    ) -> None:
        error = redact(error)[:1000] if error else None
        latency = round(time.monotonic() - t0, 3)
        stored = await asyncio.to_thread(
            self.store.finish,
            aid,
            status=status,
            source=source,
            answer=answer,
            error=error,
            model=model,
            latency_s=latency,
        )
        if not stored:
            return
        if status == "answered":
            self.answered += 1
            log.info("advisor: answered %s in %.1fs", aid, latency)
        else:
            self.degraded += 1
            log.info("advisor: %s degraded to the detector's message: %s", aid, error)

    # ------------------------------------------------------------------ reading
    async def advice_of(
        self, run_id: str, *, limit: int = 20, advice_id: str | None = None, include_context: bool = False
    ) -> list[AdviceInfo]:
        rows = await asyncio.to_thread(self.store.of_run, run_id, limit=limit, advice_id=advice_id)
        return [r.public(include_context=include_context) for r in rows]
