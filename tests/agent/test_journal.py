"""The agent's on-disk outbox, without NATS: order, acknowledgement, restart, partial records, the disk
bound, and sequence numbers that are never reused."""

from __future__ import annotations

from pathlib import Path

import pytest

from choline_agent import journal as journal_mod
from choline_agent.journal import Counters, Journal
from choline_core.events import Envelope


def env(i: int) -> Envelope:
    return Envelope(type="t", data={"i": i, "pad": "x" * 100})


def drain(j: Journal, batch: int = 7) -> list[int]:
    out = []
    while recs := j.peek(batch):
        out += [r.envelope.data["i"] for r in recs]
        j.ack(recs[-1].end, len(recs))
    return out


def test_records_come_back_in_order_until_acknowledged(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    for i in range(20):
        j.append(f"s.{i % 3}", env(i))
    assert j.pending
    first = j.peek(5)
    assert [r.envelope.data["i"] for r in first] == [0, 1, 2, 3, 4]
    assert [r.envelope.data["i"] for r in j.peek(5)] == [0, 1, 2, 3, 4], "peek does not consume"
    assert first[1].subject == "s.1"
    j.ack(first[2].end, 3)
    assert [r.envelope.data["i"] for r in j.peek(2)] == [3, 4]
    assert drain(j) == list(range(3, 20))
    assert not j.pending and j.peek(5) == []


def test_same_ids_after_a_restart(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    envs = [env(i) for i in range(10)]
    for e in envs:
        j.append("s", e)
    recs = j.peek(4)
    j.ack(recs[-1].end, 4)
    j.close()
    again = Journal(tmp_path)
    replay = again.peek(100)
    assert [r.envelope.id for r in replay] == [e.id for e in envs[4:]]
    assert [r.envelope.ts for r in replay] == [e.ts for e in envs[4:]]
    again.append("s", env(10))  # a new process writes a new segment
    assert drain(again) == list(range(4, 11))


def test_segments_rotate_and_are_removed_once_sent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_mod, "SEGMENT_BYTES", 1000)
    j = Journal(tmp_path)
    for i in range(40):
        j.append("s", env(i))
    assert len(list(tmp_path.glob("seg-*.jsonl"))) > 5
    assert drain(j, batch=3) == list(range(40))
    assert len(list(tmp_path.glob("seg-*.jsonl"))) == 1


def test_a_partial_last_record_of_a_crashed_writer_is_skipped(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    for i in range(3):
        j.append("s", env(i))
    j.close()
    seg = sorted(tmp_path.glob("seg-*.jsonl"))[-1]
    with open(seg, "ab") as fh:
        fh.write(b'{"s":"s","e":{"id":"half')  # the crash
    again = Journal(tmp_path)
    again.append("s", env(3))
    assert drain(again) == [0, 1, 2, 3]


def test_disk_is_bounded_and_drops_are_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_mod, "SEGMENT_BYTES", 2000)
    j = Journal(tmp_path, limit_bytes=1)  # raised to two segments
    for i in range(200):
        j.append("s", env(i))
    total = sum(p.stat().st_size for p in tmp_path.glob("seg-*.jsonl"))
    assert total <= 2 * 2000 + 400
    kept = drain(j)
    assert j.dropped > 0 and j.dropped + len(kept) == 200
    assert kept == list(range(200 - len(kept), 200)), "the newest are kept, in order"


def test_counters_never_reuse_a_number(tmp_path: Path) -> None:
    c = Counters(tmp_path / "counters.json")
    assert [c.take("log") for _ in range(3)] == [0, 1, 2]
    assert c.take("metric", 5) == 0 and c.take("metric") == 5
    again = Counters(tmp_path / "counters.json")  # a crash: the rest of the block is skipped
    nxt = again.take("log")
    assert nxt > 2
    assert again.take("metric") > 5
    for _ in range(Counters.BLOCK * 2):
        last = again.take("log")
    assert Counters(tmp_path / "counters.json").take("log") > last
