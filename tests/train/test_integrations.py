"""Lightning and the Hugging Face Trainer with choline, the real frameworks on the CPU: metrics reach the
run, the framework's checkpoints are handed to choline byte for byte, a pause exits 75 with a checkpoint
and the resume carries on from it, learning-rate changes apply and are recorded, epoch changes follow
each framework's rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import choline
from choline.train import read_points
from choline.train.channel import CONTROL_LOG, read_records
from choline_core import agent_protocol as proto

L = pytest.importorskip("lightning.pytorch", reason="install choline[lightning] (the dev environment has it)")
transformers = pytest.importorskip("transformers", reason="install choline[transformers] (the dev environment has it)")

from choline.integrations.huggingface import CholineCallback  # noqa: E402
from choline.integrations.lightning import CholineCheckpoint, CholineLogger  # noqa: E402


def data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def ckpt_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ===================================================================================== Lightning
class Lit(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class AtStep(L.Callback):
    def __init__(self, step: int, action: str, **params: Any) -> None:
        self.step, self.action, self.params = step, action, params

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step and not getattr(self, "sent", False):
            self.sent = True
            choline.current_run().control(self.action, **self.params)  # type: ignore[union-attr]


def lightning_fit(run_dir: Path, *callbacks: Any, epochs: int = 3) -> tuple[Any, Lit, choline.Run]:
    run = choline.init(run_dir=run_dir, seed=0, threads=1)
    ckpt = CholineCheckpoint(every_n_steps=4)
    trainer = L.Trainer(
        max_epochs=epochs, logger=CholineLogger(), callbacks=[*callbacks, ckpt], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1, log_every_n_steps=1,
        num_sanity_val_steps=0,
    )  # fmt: skip
    x, y = data()
    model = Lit()
    try:
        trainer.fit(
            model, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True),
            DataLoader(TensorDataset(x[:16], y[:16]), batch_size=8), ckpt_path=ckpt.resume_path(),
        )  # fmt: skip
    finally:
        if not run.finished:
            run.finish()
    return trainer, model, run


def test_lightning_logs_hands_off_checkpoints_and_takes_an_lr_change(tmp_path: Path) -> None:
    trainer, _, run = lightning_fit(tmp_path / "run", AtStep(5, "set", lr="*0.5"))
    assert trainer.global_step == 24
    points = read_points(tmp_path / "run")
    keys = {p["key"] for p in points}
    assert {"train_loss", "val_loss", "control/lr"} <= keys
    steps = [p["step"] for p in points if p["key"] == "train_loss"]
    assert steps == sorted(steps) and steps[-1] >= 23
    assert ckpt_steps(tmp_path / "run")[-1] == 24
    assert proto.read_manifest(tmp_path / "run" / "checkpoints" / "24").reason == "final"
    rec = read_records(tmp_path / "run" / CONTROL_LOG)
    assert [(r["action"], r["ok"], r["step"]) for r in rec] == [("set", True, 5)]
    # StepLR: 0.1 -> 0.07 at step 5, halved to 0.035, then 0.0245 at step 10, 0.01715 at 15, 0.012005 at 20
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.035 * 0.7**3)
    assert run.summary["control/lr"] == pytest.approx(0.035)


def test_lightning_pause_exits_75_and_the_resume_carries_on(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        lightning_fit(tmp_path / "run", AtStep(6, "pause"))
    assert info.value.code == 75
    assert ckpt_steps(tmp_path / "run")[-1] == 6
    assert proto.read_manifest(tmp_path / "run" / "checkpoints" / "6").reason == "pause"
    trainer, _, run = lightning_fit(tmp_path / "run")
    assert run.resume_step == 6 and trainer.global_step == 24
    assert ckpt_steps(tmp_path / "run")[-1] == 24


def test_lightning_epochs_extend(tmp_path: Path) -> None:
    trainer, _, run = lightning_fit(tmp_path / "run", AtStep(3, "set", epochs="+1"))
    assert trainer.global_step == 32 and trainer.max_epochs == 4 and run.total_epochs == 4


# ===================================================================================== Hugging Face
class HFNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        logits = self.net(x)
        out: dict[str, Any] = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class HFAt(transformers.TrainerCallback):
    def __init__(self, step: int, action: str, **params: Any) -> None:
        self.step, self.action, self.params, self.sent = step, action, params, False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step and not self.sent:
            self.sent = True
            choline.current_run().control(self.action, **self.params)  # type: ignore[union-attr]


def hf_train(run_dir: Path, out: Path, *callbacks: Any) -> tuple[Any, HFNet, choline.Run]:
    run = choline.init(run_dir=run_dir, seed=0, threads=1)
    torch.manual_seed(0)
    model = HFNet()
    x, y = data()
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=8, num_train_epochs=2, save_strategy="steps",
        save_steps=4, logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
        learning_rate=0.05, lr_scheduler_type="constant", dataloader_num_workers=0,
    )  # fmt: skip
    cb = CholineCallback()
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=[{"x": x[i], "labels": y[i]} for i in range(len(x))],
        callbacks=[*callbacks, cb],
    )  # fmt: skip
    try:
        trainer.train(resume_from_checkpoint=cb.resume_from_checkpoint(out))
    finally:
        if not run.finished:
            run.finish()
    return trainer, model, run


def test_hugging_face_logs_hands_off_checkpoints_and_takes_an_lr_change(tmp_path: Path) -> None:
    trainer, _, _run = hf_train(tmp_path / "run", tmp_path / "out", HFAt(3, "set", lr="*0.5"), HFAt(5, "set", epochs=9))
    assert trainer.state.global_step == 16
    assert ckpt_steps(tmp_path / "run")[-1] == 16
    tree = choline.load_checkpoint(tmp_path / "run" / "checkpoints" / "16")
    files = tree["huggingface"]["files"]
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= set(files)
    on_disk = (tmp_path / "out" / "checkpoint-16" / "model.safetensors").read_bytes()
    assert files["model.safetensors"].numpy().tobytes() == on_disk  # byte for byte
    lrs = {p["step"]: p["value"] for p in read_points(tmp_path / "run") if p["key"] == "learning_rate"}
    assert lrs[3] == pytest.approx(0.05) and lrs[4] == pytest.approx(0.025)
    rec = read_records(tmp_path / "run" / CONTROL_LOG)
    assert [(r["step"], r["ok"]) for r in rec] == [(3, True), (5, False)]
    assert "fixes its length" in rec[1]["message"]
    assert {"loss", "learning_rate"} <= {p["key"] for p in read_points(tmp_path / "run")}


def test_hugging_face_pause_exits_75_and_the_resume_is_exact(tmp_path: Path) -> None:
    _, ref_model, _ = hf_train(tmp_path / "ref", tmp_path / "ref-out")
    with pytest.raises(SystemExit) as info:
        hf_train(tmp_path / "run", tmp_path / "out", HFAt(6, "pause"))
    assert info.value.code == 75
    assert ckpt_steps(tmp_path / "run")[-1] == 6
    assert proto.read_manifest(tmp_path / "run" / "checkpoints" / "6").reason == "pause"
    # another machine: a fresh output folder; the Trainer's files come back from the choline checkpoint
    trainer, model, run = hf_train(tmp_path / "run", tmp_path / "out2")
    assert run.resume_step == 6 and trainer.state.global_step == 16
    a, b = weights(ref_model), weights(model)
    assert all(torch.equal(a[k], b[k]) for k in a)
