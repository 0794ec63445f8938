"""NATS goes away in the middle of a run: the agent keeps training, journals what it would have sent, and
replays it when NATS is back, with the same envelope ids and (attempt, seq): nothing lost, nothing twice."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from .conftest import AgentProcess, Plane, ended, eventually, make_config, new_run, run_events, script_bundle


@pytest.mark.slow
async def test_nats_restart_mid_run_loses_and_duplicates_nothing(
    fresh_plane: Plane, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    plane = fresh_plane
    run = new_run()
    box = tmp_path / "box"
    code = plane.put_code(script_bundle("train_choline.py"))
    args = ["--steps", "40", "--every", "10", "--sleep", "0.1"]
    agent = AgentProcess(make_config(plane, box, run, "train_choline.py", code_digest=code, args=args), box)
    agents.append(agent)

    async def some_metrics() -> bool:
        return bool(await plane.read_stream(plane.subjects.run_metrics(run), timeout=0.2))

    await eventually(some_metrics, timeout=60, what="the first metrics")
    plane.nats.stop()  # SIGTERM: the server goes away, its JetStream files stay
    await asyncio.sleep(2.0)
    status = agent.status()
    assert status["phase"] == "training" and status["nats_connected"] is False
    assert status["journal_pending"] is True, "what the agent would have sent waits on disk"
    await asyncio.to_thread(plane.nats.start)  # the same port, the same data
    assert await agent.finished(90) == 0, agent.log_tail()
    end = (await ended(plane, run)).data
    assert end["reason"] == "succeeded" and end["last_step"] == 40

    metric_batches = await plane.read_stream(plane.subjects.run_metrics(run))
    log_batches = await plane.read_stream(plane.subjects.run_logs(run))
    events = await run_events(plane, run)
    for batches in (metric_batches, log_batches, events):
        ids = Counter(b.id for b in batches)
        assert max(ids.values()) == 1, "an envelope stored twice"
    pts = [p for b in metric_batches for p in b.data["points"]]
    seqs = [p["seq"] for p in pts]
    assert len(seqs) == len(set(seqs)) == 80  # loss and val_loss at each of 40 steps
    assert sorted((p["step"], p["key"]) for p in pts) == sorted(
        (s, k) for s in range(1, 41) for k in ("loss", "val_loss")
    )
    lines = [line for b in log_batches for line in b.data["lines"]]
    line_seqs = [line["seq"] for line in lines]
    assert line_seqs == list(range(len(line_seqs))), "log lines: every seq once, in order"
    assert [line["text"] for line in lines if line["text"].startswith("step ")] == [f"step {i}" for i in range(1, 41)]
    kinds = Counter(e.type for e in events)
    assert kinds["attempt.ended"] == 1
    # checkpoints that piled up while NATS was away were superseded by the newest one: it is there
    steps = sorted(e.data["step"] for e in events if e.type == "checkpoint.uploaded")
    assert steps and steps[-1] == 40 and set(steps) <= {10, 20, 30, 40}


@pytest.mark.slow
async def test_a_restarted_agent_replays_what_its_predecessor_left(
    fresh_plane: Plane, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    """The script ends while NATS is down; the agent is killed before it could report; a new agent with
    the same config finishes the attempt (artifacts, AttemptEnded once) and replays the journal instead of
    running the script again."""
    plane = fresh_plane
    run = new_run()
    box = tmp_path / "box"
    code = plane.put_code(script_bundle("plain.py", **{"data.csv": "1,2\n"}))
    cfg = make_config(plane, box, run, "plain.py", code_digest=code, args=["30", "0.05"])
    agent = AgentProcess(cfg, box)
    agents.append(agent)

    async def started() -> bool:
        return any(
            line["text"] == "line 0"
            for b in await plane.read_stream(plane.subjects.run_logs(run), timeout=0.2)
            for line in b.data["lines"]
        )

    await eventually(started, timeout=30, what="the script's first line")
    plane.nats.stop()
    try:
        # the script ends; the agent cannot upload its artifacts without the control plane and waits
        await eventually(lambda: agent.status().get("outcome"), timeout=30, what="the script to end offline")
        await asyncio.sleep(0.5)
        assert agent.status()["phase"] == "uploading" and agent.proc.poll() is None
        agent.stop()  # SIGKILL, as a crash would
    finally:
        await asyncio.to_thread(plane.nats.start)
    again = AgentProcess(cfg, box)
    agents.append(again)
    assert await again.finished(60) == 0, again.log_tail()
    events = await run_events(plane, run)
    assert Counter(e.type for e in events)["attempt.ended"] == 1
    lines = [line for b in await plane.read_stream(plane.subjects.run_logs(run)) for line in b.data["lines"]]
    assert [line["text"] for line in lines if line["stream"] == "stdout"][:30] == [f"line {i}" for i in range(30)]
    seqs = [line["seq"] for line in lines]
    assert len(seqs) == len(set(seqs))
    assert "started" not in again.log_tail(), "the script must not run twice"
    assert plane.store.get_bytes(f"runs/{run}/artifacts/data.csv") == b"1,2\n3,4\n"
    assert again.status()["reason"] == "succeeded"
