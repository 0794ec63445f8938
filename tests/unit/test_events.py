import json

import pytest
from pydantic import ValidationError

from choline_core.events import (
    Envelope,
    Heartbeat,
    LogBatch,
    LogLine,
    MetricBatch,
    MetricPoint,
    RunRequested,
    RunSpec,
    RunState,
    registered_events,
)
from choline_core.subjects import Subjects, check_token, subject_matches


def test_envelope_round_trip_and_typed_event() -> None:
    ev = RunRequested(run_id="r1", spec=RunSpec(script="train.py", gpus="4x3090"))
    env = ev.envelope()
    assert env.type == "run.requested" and env.run_id == "r1" and len(env.id) == 32
    back = Envelope.parse(env.to_bytes())
    assert back.id == env.id
    typed = back.event(RunRequested)
    assert typed.spec.gpus == "4x3090"
    assert isinstance(back.event(), RunRequested)


def test_writers_are_strict() -> None:
    with pytest.raises(ValidationError):
        RunRequested(run_id="r1", spec=RunSpec(script="x.py"), surprise=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        RunSpec(script="x.py", gpu="typo")  # type: ignore[call-arg]


def test_readers_ignore_unknown_fields_at_every_level() -> None:
    env = RunRequested(run_id="r1", spec=RunSpec(script="x.py")).envelope()
    raw = json.loads(env.to_bytes())
    raw["added_in_v9"] = True
    raw["data"]["new_top"] = 1
    raw["data"]["spec"]["new_nested"] = {"a": 1}
    parsed = Envelope.parse(json.dumps(raw))
    assert parsed.event(RunRequested).spec.script == "x.py"


def test_wrong_or_unknown_type_is_refused() -> None:
    env = Heartbeat(box_id="b1", agent_version="0.1.0").envelope()
    with pytest.raises(ValueError, match="expected"):
        env.event(RunRequested)
    with pytest.raises(ValueError, match="unknown event type"):
        Envelope(type="no.such.thing").event()


def test_logs_and_metrics_carry_attempt_and_seq() -> None:
    batch = MetricBatch(run_id="r", attempt=2, points=[MetricPoint(seq=7, step=100, key="loss", value=0.5)])
    back = Envelope.parse(batch.envelope().to_bytes()).event(MetricBatch)
    assert (back.attempt, back.points[0].seq, back.points[0].step) == (2, 7, 100)
    logs = LogBatch(run_id="r", attempt=1, lines=[LogLine(seq=1, text="hello")])
    assert Envelope.parse(logs.envelope().to_bytes()).event(LogBatch).lines[0].text == "hello"


def test_registry_and_states() -> None:
    types = registered_events()
    assert {"run.requested", "run.state_changed", "box.heartbeat", "run.metrics", "run.logs"} <= set(types)
    assert RunState.succeeded.terminal and not RunState.running.terminal


def test_subjects_and_streams() -> None:
    s = Subjects("tx")
    assert s.run_events("r1") == "tx.runs.r1.events"
    assert s.box_heartbeat("b1") == "tx.boxes.b1.heartbeat"
    assert s.stream_for(s.run_metrics("r1")) == "TX_METRICS"
    assert s.stream_for(s.provision("requests")) == "TX_WORK"
    assert s.stream_for(s.run_control("r1")) == "TX_RUNS"
    names = [sd.name for sd in s.streams()]
    assert len(names) == len(set(names))
    # every subject the module spells is captured by exactly one stream (except rpc, core NATS)
    for subj in (
        s.run_events("a"),
        s.run_logs("a"),
        s.box_heartbeat("a"),
        s.sync("x"),
        s.deploy("y"),
        s.monitor_findings(),
    ):
        owners = [sd.name for sd in s.streams() if any(subject_matches(p, subj) for p in sd.subjects)]
        assert len(owners) == 1, subj
    with pytest.raises(ValueError):
        s.run_events("bad.id")
    with pytest.raises(ValueError):
        check_token("a b")
    assert subject_matches("a.>", "a.b.c") and not subject_matches("a.*", "a.b.c") and subject_matches("a.*.c", "a.x.c")
