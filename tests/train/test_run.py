"""choline.init and the Run: metric points, the local run folder, one history over attempts, and an exact
resume of a loop of the user's own (run.epochs, run.loader, run.checkpoint, run.restore)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import choline
from choline.train import CheckpointError, Run, history, read_points
from choline_core.errors import UserError


def test_points_carry_the_library_step_epoch_and_attempt(run_dir: Path) -> None:
    run = choline.init(config={"lr": 0.1, "layers": [1, 2]}, name="demo", run_dir=run_dir)
    assert run.config.lr == 0.1 and run.config["layers"] == [1, 2] and run.attempt == 1
    run.advance(3)
    run.log({"loss": torch.tensor(0.5), "acc": 1, "bad": float("nan"), "up": float("inf"), "skip": None}, step=999)
    run.finish()
    points = read_points(run_dir)
    assert {p["key"] for p in points} == {"loss", "acc", "bad", "up"}
    assert all(p["step"] == 3 and p["attempt"] == 1 and p["epoch"] == 0 and p["user_step"] == 999 for p in points)
    values = {p["key"]: p["value"] for p in points}
    assert values["loss"] == 0.5 and values["acc"] == 1.0 and values["up"] == math.inf and math.isnan(values["bad"])
    assert [p["seq"] for p in points] == [0, 1, 2, 3]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert all("NaN" not in line and "Infinity" not in line for line in lines)  # strict JSON
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["name"] == "demo" and meta["config"] == {"lr": 0.1, "layers": [1, 2]}


def test_bad_values_are_refused_with_the_key_named(run_dir: Path) -> None:
    run = choline.init(run_dir=run_dir)
    with pytest.raises(TypeError, match="'name'"):
        run.log({"name": "abc"})
    with pytest.raises(TypeError, match="'vec'"):
        run.log({"vec": torch.ones(3)})
    with pytest.raises(UserError, match="JSON"):
        choline.init(config={"f": object()}, run_dir=run_dir)


def test_resume_false_refuses_a_folder_with_checkpoints(run_dir: Path) -> None:
    run = choline.init(run_dir=run_dir)
    run.checkpoint({"x": {"t": torch.ones(2)}}, wait=True)
    run.finish()
    with pytest.raises(UserError, match="already holds checkpoints"):
        choline.init(run_dir=run_dir, resume=False)


def test_resume_from_an_incomplete_checkpoint_named_by_the_agent_fails_loudly(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "restored").mkdir()
    monkeypatch.setenv("CHOLINE_RESUME_FROM", str(tmp_path / "restored"))
    with pytest.raises(CheckpointError, match="not complete"):
        choline.init(run_dir=run_dir)


def test_resume_from_names_exactly_the_checkpoint_to_use(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = choline.init(run_dir=run_dir)
    for step in (1, 2, 3):
        run.advance()
        run.checkpoint({"x": {"t": torch.full((2,), float(step))}}, wait=True)
    run.finish()
    monkeypatch.setenv("CHOLINE_RESUME_FROM", str(run_dir / "checkpoints" / "2"))
    monkeypatch.setenv("CHOLINE_ATTEMPT", "7")
    run = choline.init(run_dir=tmp_path / "elsewhere")
    x = {"t": torch.zeros(2)}
    saved = run.restore(into={"x": x})
    assert saved is not None and run.step == 2 and run.attempt == 7
    assert torch.equal(x["t"], torch.full((2,), 2.0))


def test_one_history_drops_points_a_later_attempt_replaced(run_dir: Path) -> None:
    run = choline.init(run_dir=run_dir)
    for step in range(1, 7):
        run.advance()
        run.log({"loss": float(step)})
        if step == 4:
            run.checkpoint({}, wait=True)
    run.finish()  # "dies" at step 6; the checkpoint is at 4
    run = choline.init(run_dir=run_dir)
    assert run.attempt == 2 and run.restore() is not None and run.step == 4
    for step in range(5, 9):
        run.advance()
        run.log({"loss": float(step) + 0.5})
    run.finish()
    assert len(read_points(run_dir)) == 10
    hist = history(run_dir)
    assert [(p["step"], p["attempt"], p["value"]) for p in hist] == [
        (1, 1, 1.0),
        (2, 1, 2.0),
        (3, 1, 3.0),
        (4, 1, 4.0),
        (5, 2, 5.5),
        (6, 2, 6.5),
        (7, 2, 7.5),
        (8, 2, 8.5),
    ]


def test_a_restart_from_scratch_supersedes_everything_before(run_dir: Path) -> None:
    run = choline.init(run_dir=run_dir)
    run.advance()
    run.log({"loss": 1.0})
    run.finish()
    run = choline.init(run_dir=run_dir)  # no checkpoint: starts over
    assert run.restore() is None
    run.advance()
    run.log({"loss": 2.0})
    run.finish()
    assert [(p["attempt"], p["value"]) for p in history(run_dir)] == [(2, 2.0)]


def test_config_changes_on_resume_are_reported(run_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = choline.init(config={"lr": 0.1}, run_dir=run_dir)
    run.checkpoint({}, wait=True)
    run.finish()
    run = choline.init(config={"lr": 0.2}, run_dir=run_dir)
    with caplog.at_level(logging.WARNING, logger="choline.train"):
        run.restore()
    assert "config differs" in caplog.text and "lr" in caplog.text


def own_loop(run: Run, stop_at: int | None = None) -> torch.nn.Module:
    """A user's loop: run.loader, run.epochs, checkpoints every 3 batches and at each epoch's end."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=gen)
    y = x @ torch.randn(5, 1, generator=gen)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = run.loader(TensorDataset(x, y), batch_size=6, shuffle=True)
    extra = {"seen": 0}
    run.restore(into={"model": model, "opt": opt, "extra": extra})
    for _ in run.epochs(3):
        for xb, yb in loader:
            loss = torch.nn.functional.mse_loss(model(xb + 0.01 * torch.randn_like(xb)), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            extra["seen"] += len(xb)
            run.log({"loss": loss})
            if run.step == stop_at:
                raise KeyboardInterrupt
            if run.step % 3 == 0:
                run.checkpoint({"model": model, "opt": opt, "extra": extra})
        run.checkpoint({"model": model, "opt": opt, "extra": extra}, reason="epoch")
    assert extra["seen"] == 120
    return model


@pytest.mark.parametrize("stop_at", [5, 7, 14, 21])
def test_an_own_loop_resumes_exactly(tmp_path: Path, stop_at: int) -> None:
    ref = own_loop(choline.init(run_dir=tmp_path / "ref", seed=3))
    choline.current_run().finish()  # type: ignore[union-attr]
    with pytest.raises(KeyboardInterrupt):
        own_loop(choline.init(run_dir=tmp_path / "cut", seed=3), stop_at=stop_at)
    run = choline.init(run_dir=tmp_path / "cut", seed=3)
    assert run.resume_step is not None and run.resume_step < stop_at
    resumed = own_loop(run)
    run.finish()
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    h_ref = [(p["step"], p["value"]) for p in history(tmp_path / "ref")]
    assert h_ref == [(p["step"], p["value"]) for p in history(tmp_path / "cut")]
    assert len(h_ref) == 21  # 7 batches x 3 epochs
