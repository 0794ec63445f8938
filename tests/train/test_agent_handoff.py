"""The hand-off with the worker-agent, against a small Unix-socket server in the test that plays the agent:
hello first, metric points with the library's step and the attempt, a checkpoint announced only once its
manifest is on disk, local copies deleted only after ``uploaded``, controls queued for the script, and a
reconnection that re-announces what was not confirmed."""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import choline
from choline_core import agent_protocol as proto


class AgentDouble:
    """Plays the agent's side of the socket: records what the library says, sends what the test wants."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(4)
        self.messages: list[proto.Message] = []
        self.connections = 0
        self.manifest_on_disk: dict[int, bool] = {}
        self.conn: socket.socket | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.conn = conn
            self.connections += 1
            buf = b""
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    break
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    msg = proto.decode(line)
                    assert msg is not None, line
                    if isinstance(msg, proto.CheckpointReady):
                        # checked the moment the message arrives: the manifest must already be there
                        self.manifest_on_disk[msg.step] = (Path(msg.dir) / proto.MANIFEST).exists()
                    self.messages.append(msg)

    def send(self, msg: proto.Message) -> None:
        assert self.conn is not None
        self.conn.sendall(msg.to_line())

    def drop_connection(self) -> None:
        assert self.conn is not None
        self.conn.shutdown(socket.SHUT_RDWR)
        self.conn.close()

    def of(self, kind: type[proto.Message]) -> list:
        return [m for m in list(self.messages) if isinstance(m, kind)]

    def close(self) -> None:
        self._stop = True
        self.server.close()
        if self.conn is not None:
            self.conn.close()


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.01)
    assert check()


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[AgentDouble]:
    sock_dir = tempfile.mkdtemp(prefix="chl-", dir="/tmp")  # Unix socket paths must stay under 108 bytes
    double = AgentDouble(f"{sock_dir}/agent.sock")
    monkeypatch.setenv("CHOLINE_AGENT_SOCKET", double.path)
    monkeypatch.setenv("CHOLINE_RUN_ID", "r-handoff")
    monkeypatch.setenv("CHOLINE_ATTEMPT", "3")
    monkeypatch.setenv("CHOLINE_RUN_DIR", str(tmp_path / "box-run"))
    yield double
    run = choline.current_run()
    if run is not None:
        run.finish()  # before the agent goes away, or the last messages wait for it
    double.close()
    shutil.rmtree(sock_dir, ignore_errors=True)


def ckpt_dirs(run: choline.Run) -> list[int]:
    return sorted(int(p.name) for p in (run.dir / "checkpoints").iterdir() if p.name.isdigit())


def test_hello_metrics_checkpoints_uploads_and_controls(agent: AgentDouble) -> None:
    run = choline.init(config={"lr": 0.1})
    assert run.id == "r-handoff" and run.attempt == 3 and run.dir.name == "box-run"
    for step in (1, 2, 3):
        run.advance()
        run.log({"loss": 1.0 / step, "weird": float("nan")}, step=100 + step)
        run.checkpoint({"w": {"t": torch.full((4,), float(step))}}, wait=True)
    eventually(lambda: len(agent.of(proto.CheckpointReady)) == 3)

    hello = agent.messages[0]
    assert isinstance(hello, proto.Hello)
    assert (hello.run_id, hello.attempt, hello.rank, hello.library_version) == ("r-handoff", 3, 0, choline.__version__)
    points = [p for m in agent.of(proto.Metrics) for p in m.points]
    assert [(p.step, p.attempt) for p in points if p.key == "loss"] == [(1, 3), (2, 3), (3, 3)]
    assert all(p.user_step == 100 + p.step for p in points)
    assert {(p.value, p.raw) for p in points if p.key == "weird"} == {(None, "nan")}
    assert len({(p.attempt, p.seq) for p in points}) == len(points)

    ready = agent.of(proto.CheckpointReady)
    assert [m.step for m in ready] == [1, 2, 3] and agent.manifest_on_disk == {1: True, 2: True, 3: True}
    assert all(proto.verify_checkpoint(m.dir).step == m.step for m in ready)
    assert ready[-1].metrics == {"loss": pytest.approx(1 / 3), "weird": None}

    # nothing is deleted before the agent confirms an upload, even beyond the local retention of 1
    time.sleep(0.2)
    assert ckpt_dirs(run) == [1, 2, 3]
    agent.send(proto.Uploaded(step=1))
    eventually(lambda: ckpt_dirs(run) == [2, 3])
    # the agent uploads only the newest of a backlog: once 3 is stored, 2 is superseded and goes (quietly);
    # the newest stays on local disk
    agent.send(proto.Uploaded(step=3))
    eventually(lambda: ckpt_dirs(run) == [3])

    agent.send(proto.Control(id="c1", action="set", params={"lr": 0.01}))
    agent.send(proto.Control(id="c2", action="pause"))
    got: list[proto.Control] = []
    eventually(lambda: bool(got.extend(run.pending_controls())) or len(got) == 2)
    assert [(c.id, c.action, c.params) for c in got] == [("c1", "set", {"lr": 0.01}), ("c2", "pause", {})]
    assert run.pending_controls() == []

    run.finish()
    eventually(lambda: any(s.phase == "finished" for s in agent.of(proto.Status)))
    assert agent.of(proto.Status)[0].phase == "starting"


def test_unconfirmed_checkpoints_are_bounded_on_disk(agent: AgentDouble, caplog: pytest.LogCaptureFixture) -> None:
    run = choline.init(max_local=3)
    with caplog.at_level(logging.WARNING, logger="choline.train"):
        for _ in range(5):
            run.advance()
            run.checkpoint({}, wait=True)
    assert ckpt_dirs(run) == [3, 4, 5]
    assert caplog.text.count("before the agent confirmed its upload") == 1  # said once, not per checkpoint


def test_a_reconnection_says_hello_again_and_re_announces(agent: AgentDouble) -> None:
    run = choline.init()
    run.advance()
    run.checkpoint({}, wait=True)
    run.advance()
    run.checkpoint({}, wait=True)
    eventually(lambda: len(agent.of(proto.CheckpointReady)) == 2)
    agent.send(proto.Uploaded(step=1))
    eventually(lambda: ckpt_dirs(run) == [2])
    agent.drop_connection()
    eventually(lambda: agent.connections == 2 and len(agent.of(proto.Hello)) == 2)
    eventually(lambda: len(agent.of(proto.CheckpointReady)) == 3)
    assert [m.step for m in agent.of(proto.CheckpointReady)] == [1, 2, 2]  # step 1 was confirmed
    run.log({"after": 1.0})
    eventually(lambda: any(p.key == "after" for m in agent.of(proto.Metrics) for p in m.points))


def test_the_trainer_under_the_agent(agent: AgentDouble) -> None:
    run = choline.init(seed=0)
    x = torch.randn(24, 3)
    model = torch.nn.Linear(3, 2)
    choline.Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8),
        DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8),
        epochs=2,
        metrics=["accuracy"],
    ).fit()
    run.wait()
    eventually(lambda: len(agent.of(proto.CheckpointReady)) == 2)
    ready = agent.of(proto.CheckpointReady)
    assert [(m.step, m.reason, m.epoch) for m in ready] == [(3, "epoch", 0), (6, "final", 1)]
    assert "val/accuracy" in ready[-1].metrics
    phases = [s.phase for s in agent.of(proto.Status)]
    assert "training" in phases and "validating" in phases
    local = [(p["step"], p["key"]) for p in choline.history(run.dir)]
    eventually(lambda: sum(len(m.points) for m in agent.of(proto.Metrics)) == len(local))
    assert [(p.step, p.key) for m in agent.of(proto.Metrics) for p in m.points] == local


@pytest.mark.slow
def test_a_script_that_dies_of_an_exception_reports_failed(agent: AgentDouble, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    code = "import choline; run = choline.init(); run.advance(); run.log({'x': 1.0}); raise RuntimeError('boom')"
    env = {k: v for k, v in os.environ.items()}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "boom" in proc.stderr
    eventually(lambda: any(isinstance(m, proto.Status) and m.phase == "failed" for m in agent.messages))
    assert [p.key for m in agent.of(proto.Metrics) for p in m.points] == ["x"]
