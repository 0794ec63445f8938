"""A script on choline's training library under the real agent: metrics with the library's steps,
checkpoints uploaded manifest last and recorded by the syncer, retention, and a second attempt that
restores the newest checkpoint from object storage and carries on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from choline_core import faults, pipeline

from .conftest import AgentProcess, Plane, ended, eventually, make_config, new_run, run_events, script_bundle


def points(batches: list) -> list[dict]:
    return [p | {"attempt": b.data["attempt"]} for b in batches for p in b.data["points"]]


@pytest.mark.slow
async def test_choline_script_checkpoints_retention_and_resume(
    plane: Plane, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    run = new_run()
    box = tmp_path / "box"
    code = plane.put_code(script_bundle("train_choline.py"))
    barriers = tmp_path / "barriers"
    cfg = make_config(plane, box, run, "train_choline.py", code_digest=code, args=["--steps", "15", "--every", "3"])
    agent = AgentProcess(
        cfg,
        box,
        env={
            "CHOLINE_FAULTS": "agent.checkpoint_upload.midway=pause@1",
            "CHOLINE_FAULTS_DIR": str(barriers),
            # while step 3's upload is held, the library must not drop it for its local disk bound
            "CHOLINE_MAX_LOCAL_CHECKPOINTS": "10",
        },
    )
    agents.append(agent)

    # the first checkpoint's upload, stopped after its first file: no manifest yet, so not complete
    await asyncio.to_thread(faults.wait_reached, "agent.checkpoint_upload.midway", barriers, 60)
    prefix = pipeline.checkpoint_prefix(run, 1, 3)
    keys = [o.key for o in plane.store.list(prefix + "/")]
    assert keys and f"{prefix}/manifest.json" not in keys
    assert plane.store.read_manifest(prefix) is None
    resume = (await plane.box_request(run, pipeline.RESUME_METHOD, pipeline.ResumeRequest(attempt=9))).event(
        pipeline.ResumeReply
    )
    assert resume.step is None, "an upload in progress must never be offered for a resume"
    faults.release("agent.checkpoint_upload.midway", barriers)

    assert await agent.finished(90) == 0, agent.log_tail()
    end = (await ended(plane, run)).data
    assert end["reason"] == "succeeded" and end["last_step"] == 15

    pts = points(await plane.read_stream(plane.subjects.run_metrics(run)))
    loss = [(p["step"], p["value"]) for p in pts if p["key"] == "loss"]
    assert loss == [(s, 1.0 / s) for s in range(1, 16)]
    seqs = [p["seq"] for p in pts]
    assert seqs == sorted(set(seqs)) and all(p["attempt"] == 1 for p in pts)

    uploaded = sorted(e.data["step"] for e in await run_events(plane, run) if e.type == "checkpoint.uploaded")
    # while step 3's upload was held, later checkpoints piled up: the agent uploads the newest of them
    # (an older one is superseded), so the first and the last are always there
    assert uploaded[0] == 3 and uploaded[-1] == 15 and set(uploaded) <= {3, 6, 9, 12, 15}
    expected = sorted({3, *uploaded[-3:]})  # the newest three plus the best val_loss (step 3 here)

    async def live() -> list[int] | None:
        env = await plane.rpc(pipeline.SYNCER_CHECKPOINTS, pipeline.CheckpointsQuery(run_id=run))
        steps = [c.step for c in env.event(pipeline.CheckpointList).checkpoints]
        return steps if steps == expected else None

    await eventually(live, what=f"retention: {expected}")

    # attempt 2 on a new box: restores step 15 from object storage and carries on to 18
    box2 = tmp_path / "box2"
    cfg2 = make_config(
        plane, box2, run, "train_choline.py", attempt=2, code_digest=code, args=["--steps", "18", "--every", "3"]
    )
    agent2 = AgentProcess(cfg2, box2)
    agents.append(agent2)
    assert await agent2.finished(90) == 0, agent2.log_tail()
    end2 = (await ended(plane, run, attempt=2)).data
    assert end2["reason"] == "succeeded" and end2["last_step"] == 18
    batches = await plane.read_stream(plane.subjects.run_logs(run))
    logs = [(b.data["attempt"], line["text"]) for b in batches for line in b.data["lines"]]
    assert (2, "start at step 15") in logs
    assert any(a == 2 and "restored the checkpoint of step 15" in t for a, t in logs)
    pts2 = [p for p in points(await plane.read_stream(plane.subjects.run_metrics(run))) if p["attempt"] == 2]
    assert [p["step"] for p in pts2 if p["key"] == "loss"] == [16, 17, 18]
    # the weights carried on from the restored checkpoint: 18 increments in all
    assert plane.store.get_bytes(f"runs/{run}/artifacts/result.txt") == b"[18.0, 18.0, 18.0]\n"
    assert plane.store.get_bytes(f"runs/{run}/artifacts/notes/extra.txt") == b"announced\n"


@pytest.mark.slow
async def test_a_pause_ends_paused_only_after_its_checkpoint_is_stored(
    plane: Plane, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    run = new_run()
    box = tmp_path / "box"
    code = plane.put_code(script_bundle("train_choline.py"))
    args = ["--steps", "50", "--every", "100", "--pause-at", "4"]
    agent = AgentProcess(make_config(plane, box, run, "train_choline.py", code_digest=code, args=args), box)
    agents.append(agent)
    assert await agent.finished(90) == 0, agent.log_tail()
    events = await run_events(plane, run)
    kinds = [(e.type, e.data.get("step"), e.data.get("reason")) for e in events if e.type != "attempt.environment"]
    assert kinds == [
        ("attempt.started", None, None),
        ("checkpoint.uploaded", 4, "pause"),
        ("attempt.ended", None, "paused"),
    ]
    end = events[-1].data
    assert end["exit_code"] == 75 and end["last_step"] == 4
    assert plane.store.read_manifest(pipeline.checkpoint_prefix(run, 1, 4)) is not None
