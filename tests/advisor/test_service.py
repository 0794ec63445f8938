"""The advisor and the actions inside the real monitor service: a real nats-server, real object
storage, a real database, and an OpenAI-compatible server on loopback that records the prompts.

A finding is advised once with the model's validated answer; the prompt holds the traceback, the
evidence and the script, stays within the budget and holds no secret (nor does any log line);
malformed answers, timeouts, refused requests and no model at all degrade to the detector's own
message; answers are rate limited per run; a run with the auto-pause policy is paused, once,
through its control subject."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime, timezone

import pytest

from choline_core import advice as advice_api
from choline_core.bus import Bus
from choline_core.events import AttemptEnded, ControlCommand, Envelope, LogBatch, LogLine, MetricBatch, MetricPoint
from choline_core.rpc import RunInfo
from choline_core.subjects import Subjects
from choline_monitor.advice_store import advice_id
from choline_monitor.main import MonitorService, MonitorSettings

from ..monitor.conftest import eventually, running
from .conftest import API_KEY, known_run
from .llm_server import DEFAULT_ANSWER, LlmServer, Reply
from .material import SECRETS, TRACEBACK


def nan_batch(run_id: str, values: list[float | None], *, seq0: int = 1, t: float | None = None) -> MetricBatch:
    """Loss points stamped now (an auto-pause ignores findings about old data)."""
    base = t if t is not None else datetime.now(timezone.utc).timestamp()
    points = [
        MetricPoint(
            seq=seq0 + i,
            step=seq0 + i,
            key="train/loss",
            value=v,
            raw=None if v is not None else "nan",
            ts=datetime.fromtimestamp(base + i * 0.01, timezone.utc),
        )
        for i, v in enumerate(values)
    ]
    return MetricBatch(run_id=run_id, attempt=1, points=points)


async def logs(bus: Bus, run_id: str) -> None:
    lines = ["starting", f"token in output: {SECRETS['log']}", *TRACEBACK.splitlines()]
    batch = LogBatch(
        run_id=run_id, attempt=1, lines=[LogLine(seq=i, text=t, stream="stderr") for i, t in enumerate(lines)]
    )
    await bus.publish(bus.subjects.run_logs(run_id), batch)


async def advice(bus: Bus, run_id: str, **kw: object) -> list[advice_api.AdviceInfo]:
    reply = await bus.request(
        bus.subjects.rpc("monitor", advice_api.ADVICE),
        advice_api.AdviceQuery(run_id=run_id, **kw),  # type: ignore[arg-type]
    )
    return reply.event(advice_api.AdviceList).advice


async def settled(bus: Bus, run_id: str, n: int = 1) -> list[advice_api.AdviceInfo]:
    async def done() -> list[advice_api.AdviceInfo] | None:
        found = await advice(bus, run_id, include_context=True)
        return found if len(found) >= n and all(a.done for a in found) else None

    return await eventually(done, timeout=20, what=f"{n} advice of {run_id} settled")  # type: ignore[no-any-return]


async def test_a_finding_is_advised_once_with_the_models_answer(
    bus: Bus,
    advisor_settings: MonitorSettings,
    llm: LlmServer,
    provisioner: dict[str, RunInfo],
    uploaded_code: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    known_run(provisioner, "r-adv1", uploaded_code)
    async with running(MonitorService(advisor_settings)) as svc:
        await logs(bus, "r-adv1")
        await bus.publish(bus.subjects.run_metrics("r-adv1"), nan_batch("r-adv1", [2.3, 2.2, None]))
        (got,) = await settled(bus, "r-adv1")
        assert got.status == "answered" and got.source == "llm" and got.model == "test-model"
        assert got.trigger == "finding" and got.id == advice_id(got.finding_id or "")
        assert got.answer is not None
        assert got.answer.diagnosis == DEFAULT_ANSWER["diagnosis"] and got.answer.confidence == 0.85
        assert got.answer.fix.config_changes[0].name == "--lr" and got.answer.recommended_action == "restart_with_fix"
        # what was sent: the traceback, the finding's evidence, the run's command, the script's lines
        (req,) = llm.requests
        assert req.body["model"] == "test-model" and req.body["response_format"] == {"type": "json_object"}
        assert req.headers.get("authorization") == f"Bearer {API_KEY}"  # the key goes to the model server only
        prompt = req.user
        assert "RuntimeError: Function 'MseLossBackward0' returned nan values" in prompt
        assert "critical nan at step 3" in prompt and '"key":"loss"' in prompt, prompt[:600]
        assert "command: python train.py --lr 50 --epochs 3" in prompt
        assert "add_argument('--lr'" in prompt and "train/loss: 3 points" in prompt
        assert got.context == prompt and got.context_tokens is not None
        assert got.context_tokens <= advisor_settings.advisor_context_tokens
        # no secret in the prompt, and the API key in no log line and nowhere in the database
        body = json.dumps(req.body)
        for name, value in SECRETS.items():
            assert value not in body, f"the {name} secret reached the model"
        assert API_KEY not in body and API_KEY not in caplog.text
        assert svc.engine is not None
        with svc.engine.connect() as conn:
            from sqlalchemy import text

            dump = json.dumps([list(r) for r in conn.execute(text("SELECT * FROM monitor_advice")).all()], default=str)
        assert API_KEY not in dump and SECRETS["log"] not in dump
        # the finding carries a summary of its advice
        query = Envelope(type="q", data={"run_id": "r-adv1"})
        reply = await bus.request(bus.subjects.rpc("monitor", "findings"), query)
        (finding,) = reply.data["findings"]
        assert finding["advice"]["status"] == "answered" and finding["advice"]["has_fix"] is True
        # the outbox sweep publishing the finding again, or its redelivery, asks nothing new
        assert svc.monitor is not None
        from choline_monitor.store import row_to_finding

        await svc.monitor.publish([row_to_finding(r) for r in svc.monitor.store.findings("r-adv1")])
        await asyncio.sleep(0.5)
        assert len(llm.requests) == 1 and len(await advice(bus, "r-adv1")) == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "reply, error",
    [
        (Reply(content="Sorry, I can't help with that."), "not usable: no JSON object"),
        (Reply(content='{"likely_causes": ["lr"], "confidence": 0.9}'), "not usable: the answer does not validate"),
        (Reply(delay=5.0), "no answer from the model within"),
        (Reply(status=500, body={"error": {"message": "overloaded"}}), "answered 500"),
    ],
    ids=["prose", "invalid", "timeout", "server-error"],
)
async def test_bad_answers_degrade_to_the_detectors_message(
    bus: Bus,
    advisor_settings: MonitorSettings,
    llm: LlmServer,
    provisioner: dict[str, RunInfo],
    uploaded_code: str,
    reply: Reply,
    error: str,
) -> None:
    known_run(provisioner, "r-bad", uploaded_code)
    llm.script(reply)
    settings = advisor_settings.model_copy(update={"llm_timeout_s": 1.0})
    async with running(MonitorService(settings)) as svc:
        await bus.publish(bus.subjects.run_metrics("r-bad"), nan_batch("r-bad", [2.3, None]))
        (got,) = await settled(bus, "r-bad")
        assert got.status == "degraded" and got.source == "detector"
        assert got.error is not None and error in got.error
        assert got.answer is not None and got.answer.diagnosis.startswith("loss is nan")
        assert got.answer.likely_causes and got.answer.fix.empty and got.answer.confidence == 0.0
        assert svc.monitor is not None and svc.monitor.published == 1  # the finding itself is unaffected


@pytest.mark.slow
async def test_a_server_without_json_mode_is_asked_again_without_it(
    bus: Bus, advisor_settings: MonitorSettings, llm: LlmServer, provisioner: dict[str, RunInfo], uploaded_code: str
) -> None:
    known_run(provisioner, "r-json", uploaded_code)
    llm.refuse_json_mode = True
    llm.script("Here you go:\n```json\n" + json.dumps(DEFAULT_ANSWER) + "\n```")
    async with running(MonitorService(advisor_settings)):
        await bus.publish(bus.subjects.run_metrics("r-json"), nan_batch("r-json", [2.3, None]))
        (got,) = await settled(bus, "r-json")
        assert got.status == "answered" and got.answer is not None and got.answer.confidence == 0.85
        first, second = llm.requests
        assert "response_format" in first.body and "response_format" not in second.body


@pytest.mark.slow
async def test_on_demand_questions_and_no_model(
    bus: Bus, advisor_settings: MonitorSettings, llm: LlmServer, provisioner: dict[str, RunInfo], uploaded_code: str
) -> None:
    known_run(provisioner, "r-ask", uploaded_code)
    llm.script({**DEFAULT_ANSWER, "diagnosis": "Try a smaller learning rate next; the data is small."})
    subject = bus.subjects.rpc("monitor", advice_api.ADVISE)
    ask = advice_api.AdviseRequest(run_id="r-ask", question="what should I try next?", by="admin")
    settings = advisor_settings.model_copy(update={"advisor_asks_per_hour": 2})
    async with running(MonitorService(settings)):
        first = (await bus.request(subject, ask)).event(advice_api.AdviceList).advice[0]
        assert first.status == "pending" and first.trigger == "on_demand"
        (got,) = await settled(bus, "r-ask")
        assert got.id == first.id and got.answer is not None and got.answer.diagnosis.startswith("Try a smaller")
        assert "The user asks: what should I try next?" in llm.requests[0].user
        (await bus.request(subject, ask)).event(advice_api.AdviceList)
        await settled(bus, "r-ask", 2)
        limited = (await bus.request(subject, ask)).event(advice_api.AdviceList).advice[0]
        assert limited.status == "rate_limited" and "2 questions per run per hour" in (limited.error or "")
        assert len(await advice(bus, "r-ask")) == 2  # a refused question is not stored
        # an unknown finding is a clear error
        bad = await bus.request(subject, advice_api.AdviseRequest(run_id="r-ask", finding_id="0" * 32))
        assert bad.type == "error" and "no finding" in bad.data["message"]
    # without a model: the answer is the monitor's own findings, and why there is no more
    no_model = advisor_settings.model_copy(update={"llm_base_url": None, "llm_api_key": None, "llm_model": None})
    async with running(MonitorService(no_model)):
        await bus.publish(bus.subjects.run_metrics("r-none"), nan_batch("r-none", [2.3, None]))
        await asyncio.sleep(0.5)
        assert await advice(bus, "r-none") == []  # no automatic advice without a model
        reply = await bus.request(subject, advice_api.AdviseRequest(run_id="r-none"))
        assert reply.event(advice_api.AdviceList).advice[0].status == "pending"
        (got,) = await settled(bus, "r-none")
        assert got.status == "degraded" and "no language model is configured" in (got.error or "")
        assert got.answer is not None and "loss is nan" in got.answer.diagnosis
    assert len(llm.requests) == 2


@pytest.mark.slow
async def test_automatic_advice_is_rate_limited_per_run(
    bus: Bus, advisor_settings: MonitorSettings, llm: LlmServer, provisioner: dict[str, RunInfo], uploaded_code: str
) -> None:
    known_run(provisioner, "r-rl", uploaded_code)
    settings = advisor_settings.model_copy(update={"advisor_auto_per_hour": 1})
    async with running(MonitorService(settings)):
        await bus.publish(bus.subjects.run_metrics("r-rl"), nan_batch("r-rl", [2.3, None]))
        await settled(bus, "r-rl")
        # a second, different finding of the same run (its crash): stored as rate limited, no request
        ended = AttemptEnded(
            run_id="r-rl", attempt=1, reason="failed", exit_code=1, last_step=2, traceback_tail=TRACEBACK
        )
        await bus.publish(bus.subjects.run_events("r-rl"), ended)
        found = await settled(bus, "r-rl", 2)
        assert sorted(a.status for a in found) == ["answered", "rate_limited"]
        assert len(llm.requests) == 1


async def test_auto_pause_pauses_a_broken_run_once(
    bus: Bus, subjects: Subjects, advisor_settings: MonitorSettings, provisioner: dict[str, RunInfo], uploaded_code: str
) -> None:
    commands: list[Envelope] = []

    async def on(env: Envelope) -> None:
        commands.append(env)

    for run_id in ("r-ap", "r-np", "r-old"):
        known_run(provisioner, run_id, uploaded_code)
        await bus.subscribe_core(subjects.run_control(run_id), on)
    policy = subjects.rpc("monitor", advice_api.POLICY)
    settings = advisor_settings.model_copy(update={"monitor_pause_max_age_s": 600.0})
    async with running(MonitorService(settings)) as svc:
        reply = await bus.request(policy, advice_api.PolicyRequest(run_id="r-ap", policy="auto-pause"))
        info = reply.event(advice_api.PolicyInfo)
        assert info.policy == "auto-pause" and info.explicit and info.pause_on == ["nan", "divergence"]
        await bus.request(policy, advice_api.PolicyRequest(run_id="r-old", policy="auto-pause"))
        default = (await bus.request(policy, advice_api.PolicyRequest(run_id="r-np"))).event(advice_api.PolicyInfo)
        assert default.policy == "notify" and not default.explicit
        bad = await bus.request(policy, Envelope(type="x", data={"run_id": "r-np", "policy": "explode"}))
        assert bad.type == "error"

        await bus.publish(subjects.run_metrics("r-ap"), nan_batch("r-ap", [2.3, None]))
        await bus.publish(subjects.run_metrics("r-np"), nan_batch("r-np", [2.3, None]))
        old = datetime.now(timezone.utc).timestamp() - 3600
        await bus.publish(subjects.run_metrics("r-old"), nan_batch("r-old", [2.3, None], t=old))
        cmd = await eventually(lambda: commands, what="a pause command")
        assert svc.monitor is not None
        await eventually(lambda: svc.monitor.published == 3, what="three findings")  # type: ignore[union-attr]
        (env,) = commands
        command = env.event(ControlCommand)
        assert command.run_id == "r-ap" and command.action.value == "pause" and command.by == "monitor"
        assert cmd[0].run_id == "r-ap"
        assert svc.actions is not None
        (act,) = svc.actions.store.actions("r-ap")
        assert act.status == "sent" and "paused on nan" in (act.detail or "")
        (stale,) = svc.actions.store.actions("r-old")
        assert stale.status == "skipped" and "old" in (stale.detail or "")
        assert svc.actions.store.actions("r-np") == []
        # the same finding published again (the outbox sweep after a crash) pauses nothing more
        from choline_monitor.store import row_to_finding

        await svc.monitor.publish([row_to_finding(r) for r in svc.monitor.store.findings("r-ap")])
        await asyncio.sleep(0.5)
        assert len(commands) == 1
