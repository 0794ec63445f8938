"""RunWatch and FindingGate: one problem is one finding, a worse one breaks through, replays change nothing."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

from choline_core.events import (
    AttemptEnded,
    AttemptStarted,
    RunState,
    RunStateChanged,
)
from choline_core.logs import register_secret
from choline_monitor.config import DetectorConfig, MonitorConfig
from choline_monitor.detectors import Signal
from choline_monitor.watch import FindingGate, RunWatch, finding_id

from .streams import T0, batch, decaying, hb, noisy


def sig(step: int | None, t: float, severity: str = "warning", score: float = 1.0, key: str | None = None) -> Signal:
    return Signal("spike", severity, step, t, "m", {"v": score}, score, key)


CFG = DetectorConfig(cooldown_steps=100, cooldown_s=600, breakthrough=4.0)


# ------------------------------------------------------------------------------------ gate
def test_a_repeating_signal_is_one_finding() -> None:
    gate = FindingGate()
    out = [gate.admit("r1", sig(s, T0 + s), CFG)[0] for s in range(10, 60)]
    found = [f for f in out if f]
    assert len(found) == 1 and found[0].episode == 1 and gate.suppressed == 49
    assert found[0].id == finding_id("r1", "spike", 1)
    assert found[0].id == hashlib.sha256(b"r1/spike/1").hexdigest()[:32]


def test_a_quiet_gap_longer_than_the_cooldown_starts_a_new_episode() -> None:
    gate = FindingGate()
    a, _ = gate.admit("r1", sig(10, T0), CFG)
    b, _ = gate.admit("r1", sig(90, T0 + 80), CFG)  # 80 steps later: same problem
    c, new = gate.admit("r1", sig(200, T0 + 190), CFG)  # 110 steps after the last one seen
    d, _ = gate.admit("r1", sig(210, T0 + 1000), CFG)  # 810 s after: a new episode by time as well
    assert a and b is None and c and new and d
    assert (a.episode, c.episode, d.episode) == (1, 2, 3)
    assert len({a.id, c.id, d.id}) == 3


def test_worse_breaks_through_milder_does_not() -> None:
    gate = FindingGate()
    first, _ = gate.admit("r1", sig(10, T0, score=5.0), CFG)
    same, _ = gate.admit("r1", sig(11, T0 + 1, score=15.0), CFG)  # 3x: not "clearly worse"
    worse, new = gate.admit("r1", sig(12, T0 + 2, score=25.0), CFG)  # 5x: breaks through
    assert first and same is None and worse and not new
    assert worse.supersedes == first.id and worse.episode == 2
    critical, _ = gate.admit("r1", sig(13, T0 + 3, "critical", score=1.0), CFG)  # higher severity
    assert critical and critical.severity == "critical" and critical.supersedes == worse.id
    again, _ = gate.admit("r1", sig(14, T0 + 4, "warning", score=30.0), CFG)  # back to warning: old news
    assert again is None


def test_a_value_that_keeps_doubling_breaks_through_a_limited_number_of_times() -> None:
    gate = FindingGate()
    cfg = DetectorConfig(cooldown_steps=100, cooldown_s=600, breakthrough=2.0, breakthrough_limit=2)
    found = [gate.admit("r1", sig(10 + i, T0 + i, score=2.0**i), cfg)[0] for i in range(20)]
    assert [f.evidence["v"] for f in found if f] == [1.0, 2.0, 4.0]


def test_breakthrough_can_be_off_and_episode_keys_separate_problems() -> None:
    gate = FindingGate()
    off = DetectorConfig(cooldown_steps=100, cooldown_s=600, breakthrough=None)
    assert gate.admit("r1", sig(10, T0, score=1.0), off)[0]
    assert gate.admit("r1", sig(11, T0, score=1e6), off)[0] is None
    g2 = FindingGate()
    a, _ = g2.admit("r1", sig(5, T0, key="attempt-1"), CFG)
    b, _ = g2.admit("r1", sig(5, T0, key="attempt-1"), CFG)
    c, _ = g2.admit("r1", sig(5, T0 + 1, key="attempt-2"), CFG)
    assert a and b is None and c and c.episode == 2


# ----------------------------------------------------------------------------------- watch
def test_a_batch_delivered_twice_changes_nothing() -> None:
    w = RunWatch("r1")
    b = batch("r1", [2.0, 1.5, None, None])
    first = w.feed_batch(b)
    assert [f.detector for f in first] == ["nan"]
    before = json.dumps(w.state(), sort_keys=True)
    w.changed = False
    assert w.feed_batch(b) == []
    assert not w.changed and json.dumps(w.state(), sort_keys=True) == before


def test_state_round_trip_gives_the_same_findings_as_one_pass() -> None:
    values: list[float | None] = [*decaying(400, 2.3, 0.05), *noisy(100, 2.0, seed=7), None, None]
    values[150] = 50.0
    whole = RunWatch("r2").feed_batch(batch("r2", values))
    assert {f.detector for f in whole} >= {"spike", "divergence", "nan"}

    w = RunWatch("r2")
    got = []
    for lo in range(0, len(values), 37):  # in small batches, a restart (state through JSON) after each
        got += w.feed_batch(batch("r2", values[lo : lo + 37], start=lo + 1, seq0=lo + 1))
        w = RunWatch("r2", state=json.loads(json.dumps(w.state())))
    assert [(f.id, f.step, f.message) for f in got] == [(f.id, f.step, f.message) for f in whole]


def test_aliases_and_unknown_keys() -> None:
    w = RunWatch("r3")
    assert w.feed_batch(batch("r3", [1.0, None], key="train/loss"))[0].evidence["key"] == "loss"
    assert RunWatch("r3").feed_batch(batch("r3", [1.0, None], key="my_metric")) == []
    custom = MonitorConfig().with_overrides({"nan": {"keys": ["loss", "kl"]}})
    assert RunWatch("r3", custom).feed_batch(batch("r3", [1.0, None], key="kl"))


def test_stall_through_heartbeats_with_duplicates_attempts_and_pause() -> None:
    w = RunWatch("r4")
    found = []
    for i in range(5):
        found += w.feed_heartbeat(hb("r4", 100 * (i + 1), T0), T0 + 5 * i)
    for i in range(5, 60):
        found += w.feed_heartbeat(hb("r4", 500, T0), T0 + 5 * i)
        assert w.feed_heartbeat(hb("r4", 500, T0), T0 + 5 * i) == []  # the same heartbeat again
    assert [f.detector for f in found] == ["stall"]
    # a new attempt resumes from step 400: the old box's heartbeats and points no longer count
    w.feed_attempt_started(AttemptStarted(run_id="r4", attempt=2, box_id="b2", resumed_from_step=400), T0 + 400)
    assert w.feed_heartbeat(hb("r4", 500, T0, attempt=1), T0 + 401) == []
    assert w.feed_points(batch("r4", [1.0]).points, attempt=1) == []
    again = []
    for i in range(40):
        again += w.feed_heartbeat(hb("r4", 400 + i, T0, attempt=2), T0 + 405 + 5 * i)
    assert again == []
    # paused: heartbeats without progress are expected
    w.feed_state(RunStateChanged(run_id="r4", state=RunState.paused), T0 + 700)
    for i in range(60):
        assert w.feed_heartbeat(hb("r4", 439, T0, attempt=2), T0 + 705 + 5 * i) == []


def test_crash_findings_per_attempt_and_secrets_are_redacted() -> None:
    register_secret("sk-verysecretvalue-123")
    w = RunWatch("r5")
    tb = 'Traceback (most recent call last):\n  File "t.py", line 1\nRuntimeError: bad key sk-verysecretvalue-123\n'
    end = AttemptEnded(run_id="r5", attempt=1, reason="exited", exit_code=1, last_step=7, traceback_tail=tb)
    (f,) = w.feed_end(end, T0)
    assert "sk-verysecretvalue-123" not in f.message + json.dumps(f.evidence)
    assert "***" in f.message and "***" in f.evidence["traceback_tail"]
    assert w.feed_end(end, T0 + 1) == []  # the same end, delivered again
    end2 = end.model_copy(update={"attempt": 2})
    (g,) = w.feed_end(end2, T0 + 100)
    assert g.episode == 2 and g.id != f.id


def test_finding_event_carries_id_evidence_and_data_time() -> None:
    (f,) = RunWatch("r6").feed_batch(batch("r6", [1.0, None]))
    env = f.envelope()
    assert env.id == f.id and env.type == "monitor.finding" and env.run_id == "r6"
    assert env.ts == datetime.fromtimestamp(T0 + 0.2, timezone.utc)
    ev = f.event()
    assert ev.finding_id == f.id and ev.severity.value == "critical" and ev.step == 2
    assert ev.evidence["episode"] == 1 and ev.evidence["value"] == "nan"
    assert json.loads(env.to_bytes())["data"]["evidence"]["key"] == "loss"
