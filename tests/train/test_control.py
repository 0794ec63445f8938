"""Live control in-process: set lr (and the scheduler's base rates), extend epochs (and refusals), pause,
stop, cancel; every command recorded at its (step, tick); a resume from a checkpoint older than a change
replays it and ends bit-identical to a run that got the change live; the local control channel; the
agent's acknowledgements."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import choline
from choline.train import history, read_points
from choline.train.channel import main
from choline.train.control import CONTROL_LOG, Cancelled, Paused, length_bound, read_records, send, set_lr
from choline_core import agent_protocol as proto

from .test_agent_handoff import AgentDouble, agent, eventually  # noqa: F401

# 64 samples, batches of 8: 8 optimizer steps an epoch; 3 epochs = 24 steps.


def data() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    vx = torch.randn(16, 6, generator=g)
    return TensorDataset(x, y), TensorDataset(vx, (vx[:, 0] > 0).long())


class Crash(Exception):
    pass


class At(choline.Callback):
    """Do something at the end of optimizer step ``step`` (the next poll point is right after)."""

    def __init__(self, step: int, fn: Callable[[choline.Trainer], None]) -> None:
        self.step, self.fn = step, fn

    def on_step_end(self, trainer: choline.Trainer, step: int, logs: dict[str, float]) -> None:
        if step == self.step:
            self.fn(trainer)


def crash_at(step: int) -> At:
    def fn(trainer: choline.Trainer) -> None:
        trainer.run.wait()  # the checkpoint in flight lands first: the test knows where the resume starts
        raise Crash(step)

    return At(step, fn)


def send_at(step: int, action: str, **params: Any) -> At:
    return At(step, lambda trainer: send(trainer.run.dir, action, params))


def train(
    run_dir: Path,
    *,
    callbacks: tuple[choline.Callback, ...] = (),
    epochs: int = 3,
    scheduler: str = "step",
    every: int | str = 4,
) -> tuple[dict[str, torch.Tensor], choline.Run]:
    run = choline.init(run_dir=run_dir, seed=3, threads=1)
    train_set, val_set = data()
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched: Any
    if scheduler == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=8 * epochs)
    elif scheduler == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8 * epochs)
    else:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)
    trainer = choline.Trainer(
        model,
        opt,
        nn.functional.cross_entropy,
        DataLoader(train_set, batch_size=8, shuffle=True),
        DataLoader(val_set, batch_size=8),
        epochs=epochs,
        scheduler=sched,
        checkpoint_every=every,
        callbacks=list(callbacks),
    )
    try:
        trainer.fit()
    finally:
        if not run.finished:
            run.finish()
    return {k: v.clone() for k, v in model.state_dict().items()}, run


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def records(run_dir: Path) -> list[dict[str, Any]]:
    return read_records(run_dir / CONTROL_LOG)


def ckpt_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


# ===================================================================================== set lr, exact replay
@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run that got ``set lr=*0.5`` after step 5, and one that got nothing."""
    root = tmp_path_factory.mktemp("ref")
    changed, _ = train(root / "changed", callbacks=(send_at(5, "set", lr="*0.5"),))
    plain, _ = train(root / "plain")
    return {"changed": changed, "plain": plain, "dir": root / "changed"}


def test_an_lr_change_is_applied_at_its_step_and_recorded(reference: dict[str, Any]) -> None:
    assert not same(reference["changed"], reference["plain"])  # the change matters
    recs = records(reference["dir"])
    assert [(r["action"], r["ok"], r["step"], r["tick"], r["source"]) for r in recs] == [("set", True, 5, 0, "local")]
    # StepLR(step_size=5, gamma=0.7) had stepped to 0.1 * 0.7 after step 5; the change halves it
    assert recs[0]["effect"] == {"lr": {"0": pytest.approx(0.035)}}
    lrs = {p["step"]: p["value"] for p in history(reference["dir"]) if p["key"] == "lr"}
    assert lrs[5] == pytest.approx(0.07) and lrs[6] == pytest.approx(0.035)
    assert lrs[10] == pytest.approx(0.035 * 0.7)  # the scheduler's next decay starts from the new rate
    marks = [(p["step"], p["value"]) for p in history(reference["dir"]) if p["key"] == "control/lr"]
    assert marks == [(5, pytest.approx(0.035))]
    assert not (reference["dir"] / "control").exists() or not list((reference["dir"] / "control").iterdir())


def test_resume_from_a_checkpoint_older_than_the_change_replays_it(tmp_path: Path, reference: dict[str, Any]) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(Crash):
        train(run_dir, callbacks=(send_at(5, "set", lr="*0.5"), crash_at(7)))
    assert ckpt_steps(run_dir) == [4]  # the change (step 5) is newer than the only checkpoint
    weights, run = train(run_dir)  # no command this time: it comes from the record
    assert run.resume_step == 4
    assert same(weights, reference["changed"])
    recs = records(run_dir)
    assert [(r["step"], r["replay"], r["attempt"]) for r in recs] == [(5, False, 1), (5, True, 2)]
    assert [(p["step"], p["attempt"]) for p in history(run_dir) if p["key"] == "control/lr"] == [(5, 2)]


def test_resume_from_a_checkpoint_newer_than_the_change_does_not_apply_it_twice(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(Crash):
        train(run_dir, callbacks=(send_at(5, "set", lr="*0.5"), crash_at(10)))
    weights, run = train(run_dir)
    assert run.resume_step == 8
    assert same(weights, reference["changed"])
    assert [r["replay"] for r in records(run_dir)] == [False]


def test_a_new_machine_replays_from_the_control_plane_record(
    tmp_path: Path, reference: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another box: a fresh run folder, the checkpoint downloaded (CHOLINE_RESUME_FROM) and the control
    records the agent was sent (CHOLINE_CONTROL_LOG, as acknowledgements: one JSON object a line)."""
    first = tmp_path / "box1"
    with pytest.raises(Crash):
        train(first, callbacks=(send_at(5, "set", lr="*0.5"), crash_at(7)))
    downloaded = tmp_path / "download" / "4"
    shutil.copytree(first / "checkpoints" / "4", downloaded)
    acks = [
        proto.ControlAck(
            id=r["id"], ok=r["ok"], step=r["step"], action=r["action"], params=r["params"], tick=r["tick"]
        ).model_dump(mode="json")
        for r in records(first)
    ]
    log_file = tmp_path / "controls-from-plane.json"
    log_file.write_text(json.dumps(acks))
    monkeypatch.setenv("CHOLINE_RESUME_FROM", str(downloaded))
    monkeypatch.setenv("CHOLINE_CONTROL_LOG", str(log_file))
    weights, run = train(tmp_path / "box2")
    assert run.resume_step == 4
    assert same(weights, reference["changed"])


# ===================================================================================== set lr, the arithmetic
def _opt(lr: float = 0.1, groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [nn.Parameter(torch.zeros(2))], "name": f"g{i}"} for i in range(groups)]
    return torch.optim.SGD(params, lr=lr)


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5),
    "exponential": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.9),
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1 / (1 + t)),
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=30),
    "cyclic": lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.01, 0.1, step_size_up=4),
    "sequential": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o,
        [torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=4), torch.optim.lr_scheduler.ExponentialLR(o, 0.9)],
        milestones=[4],
    ),
    "warm_restarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=5),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_set_lr_scales_the_schedule_so_the_next_step_keeps_the_change(name: str) -> None:
    """After ``lr = f * current`` at step 6, every later rate is f times the unchanged schedule's."""
    a, b = _opt(), _opt()
    sa, sb = SCHEDULERS[name](a), SCHEDULERS[name](b)
    for _ in range(6):
        a.step(), sa.step(), b.step(), sb.step()
    current = b.param_groups[0]["lr"]
    effect = set_lr(b, sb, current * 0.25)
    assert effect == {"g0": pytest.approx(current * 0.25)}
    for _ in range(12):
        a.step(), sa.step(), b.step(), sb.step()
        assert b.param_groups[0]["lr"] == pytest.approx(0.25 * a.param_groups[0]["lr"], rel=1e-9, abs=1e-12)


def test_set_lr_on_one_named_group_and_plateau() -> None:
    opt = _opt(groups=2)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    assert set_lr(opt, sched, 0.02, "g1") == {"g1": 0.02}
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.02]
    sched.step(1.0)
    sched.step(2.0)  # worse: halve
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.05), pytest.approx(0.01)]
    assert set_lr(opt, sched, "*2", "1") == {"g1": pytest.approx(0.02)}
    from choline.train.control import Refused

    with pytest.raises(Refused, match=r"no parameter group named 'head'.*g0, g1"):
        set_lr(opt, sched, 0.1, "head")
    with pytest.raises(Refused, match="positive"):
        set_lr(opt, sched, -1)
    with pytest.raises(Refused, match="not a number"):
        set_lr(opt, sched, "fast")


def test_length_bound_schedulers_are_named() -> None:
    o = _opt()
    assert "OneCycleLR" in (length_bound(SCHEDULERS["onecycle"](o), 30) or "")
    assert "T_max (20)" in (length_bound(torch.optim.lr_scheduler.CosineAnnealingLR(_opt(), 20), 20) or "")
    assert length_bound(torch.optim.lr_scheduler.CosineAnnealingLR(_opt(), 5), 20) is None  # a short cycle
    assert length_bound(SCHEDULERS["step"](_opt()), 30) is None
    assert length_bound(SCHEDULERS["sequential"](_opt()), 30) is None
    assert length_bound(None, 30) is None


# ===================================================================================== epochs
def test_extend_epochs_live_and_after_a_resume(tmp_path: Path) -> None:
    ref_w, ref = train(tmp_path / "ref", callbacks=(send_at(3, "set", epochs="+2"),))
    assert ref.step == 40 and ref.total_epochs == 5
    assert [(r["ok"], r["effect"]) for r in records(tmp_path / "ref")] == [(True, {"epochs": 5})]
    points = read_points(tmp_path / "ref")
    assert max(p["epoch"] for p in points) == 4
    manifest = proto.read_manifest(tmp_path / "ref" / "checkpoints" / "40")
    assert manifest.reason == "final"

    run_dir = tmp_path / "run"
    with pytest.raises(Crash):
        train(run_dir, callbacks=(send_at(3, "set", epochs="+2"), crash_at(26)))
    weights, run = train(run_dir)  # resumes from 24 (past the old end), the extension came with the checkpoint
    assert run.resume_step == 24 and run.step == 40
    assert same(weights, ref_w)

    run_dir = tmp_path / "early"
    with pytest.raises(Crash):
        train(run_dir, callbacks=(send_at(6, "set", epochs="=4"), crash_at(7)))
    weights, run = train(run_dir)  # resumed from 4: the extension is replayed at step 6
    assert run.step == 32 and run.total_epochs == 4


def test_epochs_refused_for_a_length_bound_schedule_and_below_the_current_epoch(tmp_path: Path) -> None:
    _, run = train(
        tmp_path / "a",
        scheduler="onecycle",
        callbacks=(send_at(3, "set", epochs="+2"), send_at(12, "set", epochs=1), send_at(13, "set", nope=1)),
    )
    assert run.step == 24  # unchanged length
    recs = records(tmp_path / "a")
    assert [(r["step"], r["ok"]) for r in recs] == [(3, False), (12, False), (13, False)]
    assert "OneCycleLR's schedule is fixed by its total_steps (24)" in recs[0]["message"]
    assert "the run is in epoch 1 (counting from 0): epochs must be at least 2" in recs[1]["message"]
    assert "unknown setting(s) 'nope'; known: lr, lr.<group>, epochs" in recs[2]["message"]
    _, run = train(tmp_path / "b", scheduler="cosine", callbacks=(send_at(3, "set", epochs="+1"),))
    assert "CosineAnnealingLR's shape is fixed by its T_max (24)" in records(tmp_path / "b")[0]["message"]


def test_a_command_applies_whole_or_not_at_all(tmp_path: Path) -> None:
    train(tmp_path / "a", scheduler="onecycle", callbacks=(send_at(2, "set", lr=0.5, epochs="+1"),))
    rec = records(tmp_path / "a")[0]
    assert not rec["ok"] and "OneCycleLR" in rec["message"]
    lrs = [p["value"] for p in read_points(tmp_path / "a") if p["key"] == "lr"]
    assert max(lrs) <= 0.1 + 1e-9  # the lr part was not applied either


# ===================================================================================== pause, stop, cancel
def test_pause_checkpoints_and_exits_75_and_the_resume_is_exact(tmp_path: Path) -> None:
    ref_w, _ = train(tmp_path / "ref")
    run_dir = tmp_path / "run"
    with pytest.raises(Paused) as info:
        train(run_dir, callbacks=(send_at(6, "pause"),))
    assert info.value.code == proto.EXIT_PAUSED == 75
    assert ckpt_steps(run_dir)[-1] == 6
    assert proto.read_manifest(run_dir / "checkpoints" / "6").reason == "pause"
    assert [(r["action"], r["ok"], r["step"]) for r in records(run_dir)] == [("pause", True, 6)]
    weights, run = train(run_dir)
    assert run.resume_step == 6 and same(weights, ref_w)


def test_pause_right_after_a_checkpoint_reuses_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(Paused):
        train(run_dir, callbacks=(send_at(4, "pause"),))  # step 4: a periodic checkpoint was just taken
    assert ckpt_steps(run_dir) == [4]
    assert proto.read_manifest(run_dir / "checkpoints" / "4").reason == "periodic"
    assert records(run_dir)[0]["effect"] == {"checkpoint": 4}


def test_pause_at_an_epochs_end_replaces_its_checkpoint(tmp_path: Path) -> None:
    class PauseDuringValidation(choline.Callback):
        def on_validation_end(self, trainer: choline.Trainer, epoch: int, logs: dict[str, float]) -> None:
            if epoch == 0:
                trainer.run.control("pause")

    ref_w, _ = train(tmp_path / "ref", every="epoch")
    run_dir = tmp_path / "run"
    with pytest.raises(Paused):
        train(run_dir, callbacks=(PauseDuringValidation(),), every="epoch")
    assert ckpt_steps(run_dir) == [8]
    assert proto.read_manifest(run_dir / "checkpoints" / "8").reason == "pause"
    assert records(run_dir)[0]["tick"] == 1  # the epoch's second poll point: after validation
    weights, _ = train(run_dir, every="epoch")
    assert same(weights, ref_w)


def test_stop_ends_cleanly_with_a_final_checkpoint(tmp_path: Path) -> None:
    _, run = train(tmp_path / "run", callbacks=(send_at(11, "stop"),))
    assert run.step == 11 and run.epoch == 1
    assert proto.read_manifest(tmp_path / "run" / "checkpoints" / "11").reason == "final"
    assert [(r["action"], r["ok"], r["step"]) for r in records(tmp_path / "run")] == [("stop", True, 11)]
    assert [(p["step"], p["key"]) for p in read_points(tmp_path / "run") if p["key"].startswith("control/")] == [
        (11, "control/stop")
    ]


def test_cancel_ends_now_without_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(Cancelled) as info:
        train(tmp_path / "run", callbacks=(send_at(5, "cancel"),))
    assert info.value.code == 1
    assert ckpt_steps(tmp_path / "run") == [4]
    assert records(tmp_path / "run")[0]["action"] == "cancel"


def test_resume_is_refused_while_running(tmp_path: Path) -> None:
    train(
        tmp_path / "run", epochs=1, callbacks=(send_at(2, "resume"), At(3, lambda t: t.run.control("explode") and None))
    )
    recs = records(tmp_path / "run")
    assert [(r["action"], r["ok"]) for r in recs] == [("resume", False), ("explode", False)]
    assert recs[0]["message"] == "nothing to resume: the run is running"


# ===================================================================================== a loop of your own
def test_a_loop_of_your_own_polls_through_run_loader(tmp_path: Path) -> None:
    run = choline.init(run_dir=tmp_path / "run", seed=1, threads=1)
    train_set, _ = data()
    model = nn.Linear(6, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = run.loader(train_set, batch_size=8, shuffle=True)
    run.bind(optimizer=opt, state={"model": model, "opt": opt})
    seen: list[float] = []
    run.on_set("note", lambda v: f"noted {v}")
    for _epoch in run.epochs(4):
        for x, y in loader:
            if run.step == 3:
                run.control("set", lr=0.05, note="hi")
            if run.step == 10:
                run.control("stop")
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen.append(opt.param_groups[0]["lr"])
        run.checkpoint({"model": model, "opt": opt}, reason="epoch")
    run.finish()
    assert seen[:3] == [0.1] * 3 and seen[3:] == [0.05] * 7  # applied before batch 4 was fetched
    assert run.step == 10 and run.epoch == 1  # stopped in epoch 1, after its epoch-end code ran
    recs = records(tmp_path / "run")
    assert [(r["action"], r["step"], r["effect"]) for r in recs] == [
        ("set", 3, {"lr": {"0": 0.05}, "note": "noted hi"}),
        ("stop", 10, {"stop": True}),
    ]
    assert ckpt_steps(tmp_path / "run") == [8, 10]
    loaded = choline.load_checkpoint(tmp_path / "run" / "checkpoints" / "10")
    assert loaded["_choline"]["loaders"]["train"]["batch_index"] == 2  # a resume carries on inside epoch 1


def test_without_bind_pause_and_lr_are_refused_with_the_reason(tmp_path: Path) -> None:
    run = choline.init(run_dir=tmp_path / "run", seed=1, threads=1)
    run.control("pause")
    run.control("set", lr=0.1)
    recs = run.poll()
    run.finish()
    assert [r["ok"] for r in recs] == [False, False]
    assert "did not call run.bind" in recs[0]["message"] and "did not call run.bind" in recs[1]["message"]


# ===================================================================================== channels
def test_the_local_channel_and_its_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = choline.init(run_dir=tmp_path / "run", seed=1, threads=1)
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run.bind(optimizer=opt)
    assert main([str(run.dir), "set", "lr=0.25"]) == 0
    (run.dir / "control" / "zz-broken.json").write_text("{not json")
    (run.dir / "control" / ".half-written.tmp").write_text("{")
    recs = run.poll()
    assert [(r["source"], r["ok"], r["effect"]) for r in recs] == [("local", True, {"lr": {"0": 0.25}})]
    assert opt.param_groups[0]["lr"] == 0.25
    assert [p.name for p in (run.dir / "control").iterdir()] == [".half-written.tmp"]
    assert run.poll() == []  # nothing new: the folder is not re-read
    run.finish()
    capsys.readouterr()
    assert main([str(run.dir), "log"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["params"] == {"lr": 0.25}
    assert main([str(tmp_path / "nowhere"), "pause"]) == 2
    assert main([str(run.dir), "set"]) == 2


def test_agent_commands_are_applied_and_acknowledged(agent: AgentDouble) -> None:  # noqa: F811
    run = choline.init(seed=1, threads=1)
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run.bind(optimizer=opt, state={"model": model})
    eventually(lambda: agent.conn is not None)
    agent.send(proto.Control(id="c1", action="set", params={"lr": "*0.5"}))
    agent.send(proto.Control(id="c2", action="set", params={"epochs": "+1"}))
    eventually(lambda: len(run._link.controls) == 2 if run._link else False)
    run.advance(7)
    run.poll()
    eventually(lambda: len(agent.of(proto.ControlAck)) == 2)
    acks = agent.of(proto.ControlAck)
    assert [(a.id, a.ok, a.step, a.tick, a.action) for a in acks] == [
        ("c1", True, 7, 0, "set"),
        ("c2", False, 7, 0, "set"),
    ]
    assert acks[0].effect == {"lr": {"0": 0.05}} and acks[0].params == {"lr": "*0.5"}
    assert acks[1].message == "this loop does not count epochs (use run.epochs(n) or the Trainer)"
    agent.send(proto.Control(id="c3", action="pause"))
    eventually(lambda: len(run._link.controls) == 1 if run._link else False)
    with pytest.raises(Paused):
        run.poll()
    assert run.finished
    eventually(lambda: any(s.phase == "paused" for s in agent.of(proto.Status)))
    ready = agent.of(proto.CheckpointReady)
    assert [(m.step, m.reason) for m in ready] == [(7, "pause")]
    assert [(a.id, a.ok) for a in agent.of(proto.ControlAck)][-1] == ("c3", True)
