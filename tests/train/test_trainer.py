"""choline.Trainer in-process: interrupted and resumed fits end bit-identical, accumulation averages right,
validation metrics and checkpoints land where they should, bad arguments are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import choline
from choline.train import history, newest_valid
from choline_core.agent_protocol import verify_checkpoint
from choline_core.errors import UserError


class Boom(Exception):
    pass


class StopAt(choline.Callback):
    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_step_end(self, trainer, step, logs):  # type: ignore[no-untyped-def]
        if step == self.step:
            raise Boom


def data(n: int = 44, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, (x[:, 0] - x[:, 1] > 0).long())


def fit(run_dir: Path, *, stop_at: int | None = None, **kw) -> tuple[torch.nn.Module, choline.Trainer]:  # type: ignore[no-untyped-def]
    choline.init(run_dir=run_dir, seed=1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.25), torch.nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    kw.setdefault("checkpoint_every", 3)
    kw.setdefault("accumulate", 2)
    trainer = choline.Trainer(
        model,
        opt,
        torch.nn.functional.cross_entropy,
        DataLoader(data(), batch_size=4, shuffle=True),
        DataLoader(data(20, seed=5), batch_size=8),
        epochs=3,
        scheduler=sched,
        metrics=["accuracy"],
        grad_clip=0.5,
        callbacks=[StopAt(stop_at)],
        **kw,
    )
    trainer.fit()
    return model, trainer


@pytest.mark.parametrize(
    ("stop_at", "kw"),
    [
        (2, {}),  # before the first checkpoint: starts over
        (6, {}),  # the last step of epoch 0 (11 batches, accumulate 2: 6 steps an epoch)
        (7, {}),
        (13, {"checkpoint_every": "epoch"}),
        (8, {"accumulate": 1, "checkpoint_every": 5}),
    ],
)
def test_an_interrupted_fit_resumes_bit_identical(tmp_path: Path, stop_at: int, kw: dict) -> None:
    ref, _ = fit(tmp_path / "ref", **kw)
    with pytest.raises(Boom):
        fit(tmp_path / "cut", stop_at=stop_at, **kw)
    resumed, trainer = fit(tmp_path / "cut", **kw)
    assert trainer.run.resumed == (stop_at > 2)
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    h_ref = [(p["step"], p["key"], p["value"]) for p in history(tmp_path / "ref")]
    assert h_ref == [(p["step"], p["key"], p["value"]) for p in history(tmp_path / "cut")]


def test_logs_validation_and_checkpoints(tmp_path: Path) -> None:
    _, trainer = fit(tmp_path / "r", checkpoint_every=4)
    run = trainer.run
    assert run.step == 18
    keys = {(p["step"], p["key"]) for p in history(tmp_path / "r")}
    for step, epoch in ((6, 0), (12, 1), (18, 2)):
        assert {(step, "val/loss"), (step, "val/accuracy"), (step, "train/epoch_loss"), (step, "epoch")} <= keys, epoch
    assert all((s, "train/loss") in keys and (s, "lr") in keys for s in range(1, 19))
    run.wait()
    # steps 4, 8, 16 periodic; 12 falls on an epoch's last step (taken after validation); 18 final.
    reasons = {s: verify_checkpoint(tmp_path / "r" / "checkpoints" / str(s)).reason for s in (12, 16, 18)}
    assert reasons == {12: "epoch", 16: "periodic", 18: "final"}
    found = newest_valid(tmp_path / "r" / "checkpoints")
    assert found is not None and found[1].metrics["val/accuracy"] == run.summary["val/accuracy"]
    assert sorted(int(p.name) for p in (tmp_path / "r" / "checkpoints").iterdir()) == [12, 16, 18]  # keep=3


def test_accumulation_averages_over_the_samples_of_a_step(tmp_path: Path) -> None:
    def train(batch: int, accumulate: int, where: str) -> torch.nn.Module:
        choline.init(run_dir=tmp_path / where, seed=0)
        model = torch.nn.Linear(6, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        loader = DataLoader(data(28), batch_size=batch)  # 28 = 3 x 8 + 4: the last step has one micro-batch
        choline.Trainer(model, opt, torch.nn.functional.cross_entropy, loader, accumulate=accumulate).fit()
        return model

    a, b = train(8, 1, "a"), train(4, 2, "b")
    for x, y in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_reduce_on_plateau_gets_the_validation_loss(tmp_path: Path) -> None:
    choline.init(run_dir=tmp_path / "r", seed=0)
    model = torch.nn.Linear(6, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # no progress: the plateau is certain
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    opt.param_groups[0]["lr"] = 1e-12
    sched.best = -1.0  # nothing beats it
    choline.Trainer(
        model,
        opt,
        torch.nn.functional.cross_entropy,
        DataLoader(data(), batch_size=8),
        DataLoader(data(), batch_size=8),
        epochs=2,
        scheduler=sched,
        scheduler_step="epoch",
    ).fit()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25e-12)


def test_should_stop_ends_with_a_final_checkpoint(tmp_path: Path) -> None:
    class Halt(choline.Callback):
        def on_step_end(self, trainer, step, logs):  # type: ignore[no-untyped-def]
            if step == 3:
                trainer.should_stop = True

    choline.init(run_dir=tmp_path / "r", seed=0)
    model = torch.nn.Linear(6, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    t = choline.Trainer(
        model, opt, torch.nn.functional.cross_entropy, DataLoader(data(), batch_size=4), epochs=5, callbacks=[Halt()]
    )
    t.fit()
    t.run.wait()
    assert t.run.step == 3
    assert verify_checkpoint(tmp_path / "r" / "checkpoints" / "3").reason == "final"


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"accumulate": 0}, "accumulate"),
        ({"checkpoint_every": "hourly"}, "checkpoint_every"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"metrics": ["f1"]}, "unknown metric"),
        ({"scheduler_step": "batch"}, "scheduler_step"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, kw: dict, match: str) -> None:
    choline.init(run_dir=tmp_path / "r")
    model = torch.nn.Linear(6, 2)
    with pytest.raises(UserError, match=match):
        choline.Trainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            torch.nn.functional.cross_entropy,
            DataLoader(data(), batch_size=4),
            **kw,
        )


def test_a_batch_of_the_wrong_shape_says_how_to_fix_it(tmp_path: Path) -> None:
    choline.init(run_dir=tmp_path / "r")
    model = torch.nn.Linear(6, 2)
    loader = DataLoader(torch.randn(8, 6), batch_size=4)
    t = choline.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.functional.cross_entropy, loader)
    with pytest.raises(UserError, match=r"\(inputs\.\.\., target\)") as exc:
        t.fit()
    assert "override Trainer.compute_loss" in exc.value.one_line()


def test_a_second_fit_carries_on_instead_of_restoring_again(tmp_path: Path) -> None:
    def make(where: str, epochs: int) -> choline.Trainer:
        choline.init(run_dir=tmp_path / where, seed=2)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = DataLoader(data(), batch_size=4, shuffle=True)
        return choline.Trainer(model, opt, torch.nn.functional.cross_entropy, loader, epochs=epochs)

    once = make("once", 3)
    once.fit()
    twice = make("twice", 2)
    twice.fit()
    twice.epochs = 3
    twice.fit()
    assert twice.run.step == once.run.step == 33
    for a, b in zip(once.model.parameters(), twice.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_buffers_are_ready_before_the_first_checkpoint(tmp_path: Path) -> None:
    """Adam's moments exist only after the first step: that is when the Trainer allocates the copy buffers."""
    seen: list[set[str]] = []

    class Look(choline.Callback):
        def on_step_end(self, trainer, step, logs):  # type: ignore[no-untyped-def]
            if step == 1:
                trainer.run.wait()
                seen.append({f for f, _ in trainer.run._writer.pool._bufs})

    choline.init(run_dir=tmp_path / "r", seed=0)
    model = torch.nn.Linear(6, 2)
    opt = torch.optim.Adam(model.parameters())
    choline.Trainer(
        model, opt, torch.nn.functional.cross_entropy, DataLoader(data(), batch_size=4), callbacks=[Look()]
    ).fit()
    assert seen == [{"model.safetensors", "optimizer.safetensors"}]


def test_a_train_loader_must_be_a_loader(tmp_path: Path) -> None:
    choline.init(run_dir=tmp_path / "r")
    model = torch.nn.Linear(6, 2)
    with pytest.raises(UserError, match="DataLoader"):
        choline.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.functional.cross_entropy, [1, 2])
