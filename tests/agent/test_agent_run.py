"""The worker-agent as a real process against real NATS, S3 and the syncer: plain scripts, failures,
refused bundles, control commands."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from choline_core import pipeline
from choline_core.events import ControlAction, ControlCommand, Envelope

from .conftest import (
    AgentProcess,
    AuthPlane,
    Plane,
    bundle,
    ended,
    eventually,
    make_config,
    new_run,
    run_events,
    script_bundle,
)


def log_lines(batches: list[Envelope]) -> list[dict]:
    return [line | {"attempt": b.data["attempt"]} for b in batches for line in b.data["lines"]]


@pytest.mark.slow
async def test_plain_script_streams_its_output_and_brings_back_what_it_made(
    plane: Plane, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    run = new_run()
    code = plane.put_code(script_bundle("plain.py", **{"data.csv": "1,2\n", "untouched.txt": "same\n"}))
    cfg = make_config(plane, tmp_path / "box", run, "plain.py", code_digest=code, args=["5"])
    agent = AgentProcess(cfg, tmp_path / "box")
    agents.append(agent)
    assert await agent.finished() == 0, agent.log_tail()

    end = (await ended(plane, run)).data
    assert (end["reason"], end["exit_code"], end["box_id"]) == ("succeeded", 0, cfg.box_id)

    lines = log_lines(await plane.read_stream(plane.subjects.run_logs(run)))
    seqs = [(line["attempt"], line["seq"]) for line in lines]
    assert seqs == [(1, i) for i in range(len(seqs))], "every line once, in order, with (attempt, seq)"
    stdout = [line["text"] for line in lines if line["stream"] == "stdout"]
    assert stdout[:5] == [f"line {i}" for i in range(5)]
    assert f"run {run} attempt 1" in stdout
    assert any(line["stream"] == "stderr" and line["text"] == "to stderr" for line in lines)
    assert any(line["stream"] == "agent" and "started" in line["text"] for line in lines)

    events = {e.type: e for e in await run_events(plane, run)}
    env_ready = events["attempt.environment"].data
    assert env_ready["attempt"] == 1 and env_ready["python"].count(".") == 2

    async def artifacts() -> pipeline.ArtifactList | None:
        out = (await plane.rpc(pipeline.SYNCER_ARTIFACTS, pipeline.ArtifactsQuery(run_id=run))).event(
            pipeline.ArtifactList
        )
        return out if out.artifacts else None

    listed = await eventually(artifacts, what="the artifacts in the syncer")
    paths = {a.path for a in listed.artifacts}
    assert paths == {"outputs/result.txt", "data.csv", "model.choline-bundle.tar.gz"}, paths
    assert listed.bundle == "model.choline-bundle.tar.gz"
    assert plane.store.get_bytes(f"runs/{run}/artifacts/data.csv") == b"1,2\n3,4\n"
    with tarfile.open(fileobj=plane.store.open(f"runs/{run}/artifacts/model.choline-bundle.tar.gz"), mode="r|gz") as tf:
        assert sorted(m.name for m in tf) == ["model/card.json", "model/weights.bin"]
    full_log = plane.store.get_bytes(pipeline.logs_key(run, 1)).decode()
    assert "line 4" in full_log and "to stderr" in full_log
    status = agent.status()
    assert status["ended"] is True and status["phase"] == "finished" and status["reason"] == "succeeded"

    heartbeats = await plane.read_stream(plane.subjects.box_heartbeat(cfg.box_id))
    assert heartbeats and heartbeats[-1].data["agent_version"] and heartbeats[-1].data["run_id"] == run


async def test_failing_script_ends_failed_with_the_traceback_tail(
    plane: Plane, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    run = new_run()
    code = plane.put_code(script_bundle("fail.py"))
    agent = AgentProcess(make_config(plane, tmp_path / "box", run, "fail.py", code_digest=code), tmp_path / "box")
    agents.append(agent)
    assert await agent.finished() == 0, agent.log_tail()
    end = (await ended(plane, run)).data
    assert end["reason"] == "failed" and end["exit_code"] == 1
    tail = end["traceback_tail"]
    assert tail.startswith("Traceback (most recent call last)")
    assert tail.rstrip().endswith("ValueError: boom: the data is wrong")
    assert "inner()" in tail and "about to fail" not in tail


async def test_a_bundle_that_reaches_outside_is_refused(
    plane: Plane, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    """(Every kind of escape is refused in ``test_box_parts``; here, what the attempt does about it.)"""
    info = tarfile.TarInfo("../escaped.txt")
    info.size = 1
    run = new_run()
    code = plane.put_code(bundle({"plain.py": "print('never runs')\n"}, extra=[info]))
    box = tmp_path / "box"
    agent = AgentProcess(make_config(plane, box, run, "plain.py", code_digest=code), box)
    agents.append(agent)
    assert await agent.finished() == 0, agent.log_tail()
    end = (await ended(plane, run)).data
    assert end["reason"] == "failed" and end["exit_code"] is None
    assert end["traceback_tail"].startswith("refused the code bundle"), end["traceback_tail"]
    assert not (box / "attempts" / "escaped.txt").exists()
    assert not (box / "attempts" / "1" / "code").exists()
    lines = log_lines(await plane.read_stream(plane.subjects.run_logs(run)))
    assert not any(line["text"] == "never runs" for line in lines)


async def test_missing_code_bundle_is_a_clear_failure(plane: Plane, tmp_path: Path, agents: list[AgentProcess]) -> None:
    run = new_run()
    box = tmp_path / "box"
    agent = AgentProcess(make_config(plane, box, run, "train.py", code_digest="ab" * 32), box)
    agents.append(agent)
    assert await agent.finished() == 0, agent.log_tail()
    end = (await ended(plane, run)).data
    assert end["reason"] == "failed" and "is not in object storage" in end["traceback_tail"]


@pytest.mark.slow
async def test_stop_command_stops_a_plain_script(plane: Plane, tmp_path: Path, agents: list[AgentProcess]) -> None:
    run = new_run()
    code = plane.put_code(script_bundle("sleepy.py"))
    box = tmp_path / "box"
    agent = AgentProcess(make_config(plane, box, run, "sleepy.py", code_digest=code), box)
    agents.append(agent)

    async def sleeping() -> bool:
        lines = log_lines(await plane.read_stream(plane.subjects.run_logs(run), timeout=0.2))
        return any(line["text"] == "sleeping" for line in lines)

    await eventually(sleeping, timeout=30, what="the script to start")
    cmd = ControlCommand(run_id=run, action=ControlAction.stop, by="test")
    await plane.bus.publish(plane.subjects.run_control(run), cmd.envelope(run_id=run))
    assert await agent.finished(30) == 0
    end = (await ended(plane, run)).data
    assert end["reason"] == "stopped"
    lines = log_lines(await plane.read_stream(plane.subjects.run_logs(run)))
    assert any(line["stream"] == "agent" and line["text"] == "control: stop" for line in lines)


@pytest.mark.slow
async def test_environment_from_the_spec_reuses_the_base_torch(
    plane: Plane, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    run = new_run()
    code = plane.put_code(script_bundle("which_torch.py"))
    spec = pipeline.EnvSpec(python="3.11", requirements=["torch>=2.0"], source="requirements.txt")
    env_digest = plane.put_env(spec.to_bytes())
    assert env_digest == spec.digest()
    box = tmp_path / "box"
    cfg = make_config(plane, box, run, "which_torch.py", code_digest=code, env_digest=env_digest)
    agent = AgentProcess(cfg, box)
    agents.append(agent)
    assert await agent.finished() == 0, agent.log_tail()
    assert (await ended(plane, run)).data["reason"] == "succeeded"
    ready = next(e for e in await run_events(plane, run) if e.type == "attempt.environment").data
    assert ready["env_digest"] == env_digest and ready["torch_source"] == "base" and not ready["reused"]
    lines = [line["text"] for line in log_lines(await plane.read_stream(plane.subjects.run_logs(run)))]
    venv = box / "envs" / env_digest[:16]
    assert f"torch {ready['torch']} at" in "\n".join(lines)
    assert f"python {venv}/bin/python" in lines, "the script ran in the run's environment"


@pytest.mark.slow
async def test_failing_requirements_end_the_attempt_with_the_install_log(
    plane: Plane, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    run = new_run()
    code = plane.put_code(script_bundle("plain.py"))
    spec = pipeline.EnvSpec(requirements=["numpy>=999"], source="requirements.txt")
    env_digest = plane.put_env(spec.to_bytes())
    box = tmp_path / "box"
    agent = AgentProcess(make_config(plane, box, run, "plain.py", code_digest=code, env_digest=env_digest), box)
    agents.append(agent)
    assert await agent.finished() == 0, agent.log_tail()
    end = (await ended(plane, run)).data
    assert end["reason"] == "failed" and end["exit_code"] is None
    tail = end["traceback_tail"]
    assert tail.startswith("installing the requirements failed (pip exited with 1)")
    assert "numpy>=999" in tail and "No matching distribution" in tail
    lines = log_lines(await plane.read_stream(plane.subjects.run_logs(run)))
    assert not any(line["text"] == "line 0" for line in lines), "the script never ran"
    assert any(line["stream"] == "agent" and line["text"].startswith("setup failed") for line in lines)


@pytest.mark.slow
async def test_the_agent_needs_nothing_beyond_a_boxs_credentials(
    auth_plane: AuthPlane, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    """NATS in operator mode: the agent holds box credentials (its run's subjects, its control subject,
    its own inbox, no JetStream API) and still does everything: fetch, logs, events, heartbeats, artifacts."""
    plane = auth_plane.plane
    run, box_id = new_run(), "box-auth"
    code = plane.put_code(script_bundle("plain.py", **{"data.csv": "1,2\n"}))
    box = tmp_path / "box"
    cfg = make_config(
        plane,
        box,
        run,
        "plain.py",
        box_id=box_id,
        code_digest=code,
        nats_creds=auth_plane.box_creds(run, box_id),
        inbox_prefix=plane.subjects.inbox_prefix(box_id),
    )
    agent = AgentProcess(cfg, box)
    agents.append(agent)
    assert await agent.finished() == 0, agent.log_tail()
    assert (await ended(plane, run)).data["reason"] == "succeeded"
    lines = log_lines(await plane.read_stream(plane.subjects.run_logs(run)))
    assert [line["text"] for line in lines if line["stream"] == "stdout"][:5] == [f"line {i}" for i in range(5)]
    assert await plane.read_stream(plane.subjects.box_heartbeat(box_id))
    assert plane.store.get_bytes(f"runs/{run}/artifacts/data.csv") == b"1,2\n3,4\n"
