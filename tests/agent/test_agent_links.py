"""The agent's links to the world: control commands relayed to the training library, object storage
reached through the box's tunnel endpoint and retried when it drops mid-upload, the launch command."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from choline_agent.agent import Agent
from choline_core import faults, pipeline
from choline_core.events import ControlAction, ControlCommand

from .conftest import AgentProcess, Forwarder, Plane, ended, eventually, make_config, new_run, script_bundle


async def lines_of(plane: Plane, run: str) -> list[tuple[str, str]]:
    batches = await plane.read_stream(plane.subjects.run_logs(run), timeout=0.2)
    return [(line["stream"], line["text"]) for b in batches for line in b.data["lines"]]


@pytest.mark.slow
async def test_control_commands_reach_the_training_library(
    plane: Plane, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    run = new_run()
    box = tmp_path / "box"
    code = plane.put_code(script_bundle("control_echo.py"))
    agent = AgentProcess(make_config(plane, box, run, "control_echo.py", code_digest=code), box)
    agents.append(agent)

    async def library_waiting() -> bool:
        lines = await lines_of(plane, run)
        connected = any(s == "agent" and t.startswith("training library") for s, t in lines)
        return connected and ("stdout", "waiting for a control") in lines

    await eventually(library_waiting, timeout=60, what="the library to connect")
    cmd = ControlCommand(run_id=run, action=ControlAction.set, params={"lr": 0.001}, by="test")
    await plane.bus.publish(plane.subjects.run_control(run), cmd.envelope(run_id=run))
    assert await agent.finished(60) == 0, agent.log_tail()
    assert (await ended(plane, run)).data["reason"] == "succeeded"
    assert ("stdout", "control set [('lr', 0.001)]") in await lines_of(plane, run)


@pytest.mark.slow
async def test_uploads_go_through_the_tunnel_and_survive_it_dropping(
    plane: Plane, forwarder: Forwarder, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    run = new_run()
    endpoint = f"http://127.0.0.1:{forwarder.port}"
    ev = pipeline.BoxEndpoints(run_id=run, attempt=1, box_id="b", nats_url=plane.nats.url, s3_endpoint=endpoint)
    await plane.bus.publish(plane.subjects.run_events(run), ev.envelope(run_id=run))
    syncer = plane.syncer.syncer
    assert syncer is not None
    await eventually(lambda: syncer.store.endpoint_for(run, 1) == endpoint, what="the syncer to learn the endpoint")

    box, barriers = tmp_path / "box", tmp_path / "barriers"
    code = plane.put_code(script_bundle("train_choline.py"))
    cfg = make_config(plane, box, run, "train_choline.py", code_digest=code, args=["--steps", "6", "--every", "3"])
    agent = AgentProcess(
        cfg,
        box,
        env={
            "CHOLINE_FAULTS": "agent.checkpoint_upload.midway=pause@1",
            "CHOLINE_FAULTS_DIR": str(barriers),
            "CHOLINE_MAX_LOCAL_CHECKPOINTS": "10",
        },
    )
    agents.append(agent)
    await asyncio.to_thread(faults.wait_reached, "agent.checkpoint_upload.midway", barriers, 60)
    used = forwarder.connections
    assert used >= 2, "the code bundle and the first checkpoint file came through the tunnel"
    forwarder.cut()  # the tunnel (or S3) drops between a checkpoint's files and its manifest
    faults.release("agent.checkpoint_upload.midway", barriers)
    await asyncio.sleep(2.0)
    assert plane.store.read_manifest(pipeline.checkpoint_prefix(run, 1, 3)) is None
    forwarder.restore()
    assert await agent.finished(90) == 0, agent.log_tail()
    assert (await ended(plane, run)).data["reason"] == "succeeded"
    assert plane.store.read_manifest(pipeline.checkpoint_prefix(run, 1, 3)) is not None
    assert plane.store.read_manifest(pipeline.checkpoint_prefix(run, 1, 6)) is not None
    assert "checkpoint of step 3" in agent.log_tail(200) and "retrying" in agent.log_tail(200)
    assert forwarder.connections > used


def test_launch_command(plane_free_config: pipeline.AgentConfig, tmp_path: Path) -> None:
    script = tmp_path / "code" / "t.py"
    script.parent.mkdir(parents=True)
    script.write_text("import choline\ncholine.Trainer\n")
    plain = tmp_path / "code" / "p.py"
    plain.write_text("print(1)\n")
    one = Agent(plane_free_config.model_copy(update={"gpus": 1}))
    assert one.command("py", script)[:3] == ["py", "-u", str(script)]
    four = Agent(plane_free_config.model_copy(update={"gpus": 4}))
    assert four.command("py", script)[:5] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert four.command("py", plain)[:2] == ["py", "-u"], "a plain script gets one process that sees every GPU"
    dist = Agent(plane_free_config.model_copy(update={"gpus": 2, "distributed": True}))
    assert "--nproc_per_node=2" in dist.command("py", plain)


@pytest.fixture
def plane_free_config(tmp_path: Path) -> pipeline.AgentConfig:
    return pipeline.AgentConfig(
        run_id="r1", attempt=1, box_id="b1", workdir=str(tmp_path / "wd"), nats_url="nats://127.0.0.1:1", script="t.py"
    )
