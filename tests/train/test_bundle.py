"""Model bundles: save, load from the folder and the tarball, identical outputs; the card's refusals; every
preprocessing op; safe extraction of hostile archives; the Trainer's bundle at the end of fit; the digits
example's complete card; the agent recognises the bundle by the same names."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import choline
from choline.bundle import (
    SUFFIX,
    BundleError,
    DataCard,
    Input,
    Output,
    Preprocessing,
    Step,
    clip,
    data_card,
    extract,
    load_bundle,
    missing_fields,
    normalize,
    pack,
    reshape,
    resize,
    save_bundle,
    scale,
    shift,
    transpose,
)

from ._procs import REPO, clean_env
from .models.tiny_cnn import Tied, TinyCNN

CARD = {
    "purpose": "Tell three kinds of 6x6 squiggles apart.",
    "inputs": [Input("image", "uint8", [36], range=(0, 255), description="6x6 pixels, row by row")],
    "outputs": [Output("kind", kind="logits", shape=[3], labels=["dot", "dash", "cross"])],
    "data": [DataCard("squiggles", examples=120, source="generated in the test")],
}
STEPS = [scale(1 / 255), normalize(0.5, 0.25), reshape(1, 6, 6), resize(8, 8)]


def trained_cnn() -> TinyCNN:
    torch.manual_seed(0)
    model = TinyCNN(channels=4, classes=3)
    model.train()
    model(torch.randn(16, 1, 8, 8))  # BatchNorm running statistics that are not the defaults
    return model


def images(n: int = 5) -> torch.Tensor:
    return torch.randint(0, 256, (n, 36), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[TinyCNN, Any]:
    model = trained_cnn()
    bundle = save_bundle(model, tmp_path / "squiggles", card=CARD, kwargs={"channels": 4, "classes": 3},
                         preprocessing=STEPS, example=[images()])  # fmt: skip
    return model, bundle


# ===================================================================================== round trip
def test_round_trip_gives_identical_outputs_from_the_folder_and_the_tarball(saved: Any, tmp_path: Path) -> None:
    model, bundle = saved
    x = images()
    model.eval()
    with torch.no_grad():
        expected = model(Preprocessing(STEPS)(x))
    assert bundle.tarball == tmp_path / f"squiggles{SUFFIX}"
    assert sorted(p.relative_to(bundle.path).as_posix() for p in bundle.path.rglob("*") if p.is_file()) == [
        "card.json",
        "code/tests/train/models/tiny_cnn.py",
        "weights.safetensors",
    ]
    from_folder = load_bundle(bundle.path)
    from_tar = load_bundle(bundle.tarball, extract_to=tmp_path / "unpacked")
    assert from_tar.path == tmp_path / "unpacked" / "squiggles"
    for b in (from_folder, from_tar):
        assert torch.equal(b.predict(x), expected)
        assert torch.equal(b.predict(image=x), expected)
        assert b.labels == ["dot", "dash", "cross"]
        assert not b.model.training
    card = from_folder.card
    assert card["model"]["module"] == "tests.train.models.tiny_cnn" and card["model"]["factory"] == "TinyCNN"
    assert card["preprocessing"][0] == {"op": "scale", "factor": pytest.approx(1 / 255)}
    assert card["preprocessing"][3] == {"op": "resize", "height": 8, "width": 8, "mode": "bilinear"}
    assert card["code"]["digest"].startswith("sha256:") and card["environment"]["torch"] == torch.__version__
    assert card["training"]["data"] == [{"name": "squiggles", "examples": 120, "source": "generated in the test"}]
    assert pack(bundle.path, tmp_path / "again.tar.gz").read_bytes() == bundle.tarball.read_bytes()  # reproducible


@pytest.mark.slow
def test_a_fresh_process_loads_the_tarball(saved: Any, tmp_path: Path) -> None:
    """No module of the test is imported there: the model comes from the bundle's code/ alone."""
    model, bundle = saved
    model.eval()
    with torch.no_grad():
        expected = model(Preprocessing(STEPS)(images()))
    torch.save(expected, tmp_path / "expected.pt")
    code = (
        "import sys, torch; from choline import load_bundle\n"
        f"b = load_bundle({str(bundle.tarball)!r}, extract_to={str(tmp_path / 'fresh')!r})\n"
        "x = torch.randint(0, 256, (5, 36), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)\n"
        f"assert torch.equal(b.predict(x), torch.load({str(tmp_path / 'expected.pt')!r}))\n"
        "assert not any(m.startswith('tests') for m in sys.modules), 'the test package leaked in'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=clean_env(), capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_tied_weights_and_an_installed_factory(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tied = Tied()
    b = save_bundle(tied, tmp_path / "tied", card={**CARD, "inputs": [Input("tokens", "int64", [None], (0, 10))],
                    "outputs": []}, tarball=False)  # fmt: skip
    tokens = torch.randint(0, 11, (2, 5))
    assert torch.equal(load_bundle(b.path).predict(tokens), tied.eval()(tokens))
    assert b.tarball is None
    lin = nn.Linear(3, 2)  # torch.nn.Linear comes from an installed package: no code copied
    b = save_bundle(lin, tmp_path / "lin", card={**CARD, "inputs": [Input("x", "float32", [3])], "outputs": []},
                    kwargs={"in_features": 3, "out_features": 2})  # fmt: skip
    assert b.card["model"]["code"] == [] and b.card["model"]["module"] == "torch.nn.modules.linear"
    assert torch.equal(load_bundle(b.path).predict(torch.ones(1, 3)), lin(torch.ones(1, 3)).detach())


def test_a_changed_file_is_refused(saved: Any) -> None:
    _, bundle = saved
    w = bundle.path / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"weights\.safetensors does not match the card"):
        load_bundle(bundle.path)


# ===================================================================================== refusals
def test_a_card_without_purpose_or_inputs_is_refused_with_everything_missing(tmp_path: Path) -> None:
    with pytest.raises(BundleError) as info:
        save_bundle(trained_cnn(), tmp_path / "b", card={"outputs": []}, kwargs={"channels": 4})
    assert "missing or gets wrong: purpose; inputs" in str(info.value)
    assert info.value.detail == {"missing": ["purpose", "inputs"]}
    assert not (tmp_path / "b").exists()
    bad = {
        "purpose": "  ",
        "inputs": [{"name": "x"}, {"name": "x", "dtype": "complex", "shape": [0], "range": [2, 1]}],
        "outputs": [{"name": "y", "shape": [3], "labels": ["a", "b"]}],
    }
    assert missing_fields(bad) == [
        "purpose",
        "inputs[0].dtype",
        "inputs[0].shape",
        "inputs[1].name: 'x' twice",
        "inputs[1].dtype: 'complex' is not one of float32, float64, float16, bfloat16, int64, int32, int16, int8, "
        "uint8, bool",
        "inputs[1].shape: positive sizes or null",
        "inputs[1].range: [min, max] with min <= max",
        "outputs[0].labels: 2 labels for a last dimension of 3",
    ]


def _local_model() -> nn.Module:
    class Local(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    return Local()


@pytest.mark.parametrize(
    ("model", "kwargs", "factory", "message"),
    [
        (nn.Sequential(nn.Linear(2, 2)), None, None, "torch.nn.Sequential cannot be rebuilt"),
        (_local_model(), None, None, "define the model's class or builder at module level"),
        (TinyCNN(), {"channels": object()}, None, "must be JSON values"),
        (nn.Linear(2, 2), None, None, "needs in_features, out_features to be rebuilt"),
        (TinyCNN(), {"channels": 8}, None, "weights do not fit the rebuilt model"),
        (TinyCNN(), None, lambda: TinyCNN(), "cannot be imported again"),
    ],
)
def test_models_that_cannot_be_rebuilt_are_refused(
    tmp_path: Path, model: nn.Module, kwargs: Any, factory: Any, message: str
) -> None:
    card = {"purpose": "p", "inputs": [Input("x", "float32", [1, 4, 4])]}
    with pytest.raises(BundleError, match=message):
        save_bundle(model, tmp_path / "b", card=card, kwargs=kwargs, factory=factory)
    assert not (tmp_path / "b").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written folder either


def test_an_existing_folder_is_kept_unless_overwrite(saved: Any) -> None:
    model, bundle = saved
    with pytest.raises(BundleError, match="already exists"):
        save_bundle(model, bundle.path, card=CARD, kwargs={"channels": 4, "classes": 3}, preprocessing=STEPS)
    with pytest.raises(BundleError, match="fails on an example of its input schema"):  # uint8 into a conv
        save_bundle(model, bundle.path, card=CARD, kwargs={"channels": 4, "classes": 3}, overwrite=True)
    assert load_bundle(bundle.path).card == bundle.card  # the failed save lost nothing
    save_bundle(model, bundle.path, card=CARD, kwargs={"channels": 4, "classes": 3}, preprocessing=STEPS,
                overwrite=True)  # fmt: skip


# ===================================================================================== preprocessing
def test_each_preprocessing_op() -> None:
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    assert torch.equal(scale(0.5)(x), x * 0.5)
    assert torch.equal(shift(-1)(x), x - 1)
    assert torch.equal(clip(2, 5)(x), x.clamp(2, 5))
    mean, std = [1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 4.0, 4.0]
    assert torch.equal(normalize(mean, std)(x), (x - torch.tensor(mean)) / torch.tensor(std))
    assert reshape(12)(x).shape == (2, 12) and reshape(-1, 2)(x).shape == (2, 6, 2)
    assert torch.equal(transpose(1, 0)(x), x.permute(0, 2, 1))
    assert resize(6, 8)(x).shape == (2, 6, 8) and resize(6, 8, "nearest")(x.unsqueeze(1)).shape == (2, 1, 6, 8)
    assert Step("cast", dtype="float16")(x).dtype == torch.float16
    assert scale(2)(torch.ones(1, 2, dtype=torch.uint8)).dtype == torch.float32
    pipe = Preprocessing([s.to_json() for s in STEPS])
    assert pipe.to_json() == [s.to_json() for s in STEPS] and json.dumps(pipe.to_json())
    for bad, message in [
        ({"op": "blur"}, "unknown preprocessing op 'blur'"),
        ({"op": "scale"}, "missing factor"),
        ({"op": "scale", "factor": float("nan")}, "finite"),
        ({"op": "normalize", "mean": 0, "std": [1, 0]}, "std of 0"),
        ({"op": "resize", "height": 0, "width": 2}, "positive integer"),
        ({"op": "transpose", "axes": [0, 0]}, "not a permutation"),
        ({"op": "cast", "dtype": "float8"}, "not one of"),
        ({"op": "scale", "factor": 1, "speed": 2}, "unknown parameter"),
    ]:
        with pytest.raises(BundleError, match=message):
            Step.from_json(bad)


# ===================================================================================== safe extraction
def _tar(path: Path, entries: list[tuple[str, bytes | None, bytes]]) -> Path:
    """entries: (name, type, data); type None = a regular file."""
    with tarfile.open(path, "w:gz") as tf:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            if kind is None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                info.type = kind
                info.linkname = data.decode()
                tf.addfile(info)
    return path


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([("b/card.json", None, b"{}"), ("b/../../evil", None, b"x")], "goes up"),
        ([("/tmp/evil-abs", None, b"x")], "is absolute"),
        ([("b/card.json", None, b"{}"), ("b/link", tarfile.SYMTYPE, b"/etc/passwd")], "is a link"),
        ([("b/card.json", None, b"{}"), ("b/hard", tarfile.LNKTYPE, b"b/card.json")], "is a link"),
        ([("b/fifo", tarfile.FIFOTYPE, b"")], "not a regular file"),
        ([("b/dev", tarfile.CHRTYPE, b"")], "not a regular file"),
        ([("a/card.json", None, b"{}"), ("b/card.json", None, b"{}")], "one top-level folder"),
        ([("card.json", None, b"{}")], "must be a folder"),
        ([("b/x", None, b"1"), ("b/x", None, b"2")], "appears twice"),
        ([("b/big", None, b"x" * 2000)], "unpacks to more than 1000 bytes"),
        ([("b\\..\\evil", None, b"x")], "unsafe name"),
    ],
)
def test_hostile_archives_are_refused_before_anything_is_written(
    tmp_path: Path, entries: list[tuple[str, bytes | None, bytes]], message: str
) -> None:
    archive = _tar(tmp_path / "hostile.tar.gz", entries)
    dest = tmp_path / "dest" / "inner"
    with pytest.raises(BundleError, match=message):
        extract(archive, dest, max_bytes=1000)
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil-abs").exists()
    assert not dest.exists() or list(dest.iterdir()) == []


def test_extract_writes_plain_files_with_safe_modes(tmp_path: Path) -> None:
    archive = tmp_path / "ok.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("b/run.sh")
        info.size, info.mode = 2, 0o4777  # setuid, world-writable: not kept
        tf.addfile(info, io.BytesIO(b"hi"))
    folder = extract(archive, tmp_path / "out")
    assert (folder / "run.sh").read_bytes() == b"hi"
    assert (folder / "run.sh").stat().st_mode & 0o7777 == 0o644 & ~_umask()
    with pytest.raises(BundleError, match="already exists"):
        extract(archive, tmp_path / "out")
    with pytest.raises(BundleError, match="not a readable tar archive"):
        extract(tmp_path / "nothing.tar.gz", tmp_path / "x")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ===================================================================================== the Trainer, data, the agent
def test_the_trainer_saves_a_bundle_at_the_end_of_fit(tmp_path: Path) -> None:
    run = choline.init(run_dir=tmp_path / "run", seed=0, threads=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 36), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (40,), generator=g)
    pipe = Preprocessing(STEPS)
    model = TinyCNN()
    trainer = choline.Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), nn.functional.cross_entropy,
        DataLoader(TensorDataset(pipe(x), y), batch_size=8), DataLoader(TensorDataset(pipe(x), y), batch_size=20),
        epochs=2, metrics=["accuracy"],
        bundle={"path": tmp_path / "model", "card": CARD, "kwargs": {"channels": 4, "classes": 3},
                "preprocessing": STEPS},
    )  # fmt: skip
    trainer.fit()
    run.finish()
    b = trainer.bundle
    assert b is not None and b.tarball is not None and b.tarball.exists()
    card = b.card
    assert card["training"]["run_id"] == run.id and card["training"]["step"] == 10
    assert card["metrics"]["final"]["val/accuracy"] == run.summary["val/accuracy"]
    assert card["metrics"]["best"]["val/loss"]["mode"] == "min"
    assert "lr" not in card["metrics"]["final"]
    assert torch.equal(load_bundle(b.path).predict(x), model.eval()(pipe(x)))


def test_data_card_and_choline_data_in_both_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "laptop" / "squiggles"
    folder.mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"abc")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.bin").write_bytes(b"defg")
    card = data_card("squiggles", folder, examples=2)
    assert card.size_bytes == 7 and card.manifest is not None and card.manifest.startswith("sha256:")
    assert data_card("squiggles", folder).manifest == card.manifest

    from choline.datasets.paths import remember

    monkeypatch.delenv("CHOLINE_DATA_DIR", raising=False)
    remember("squiggles", folder)  # what 'choline data push' records on this machine
    assert choline.data("squiggles") == folder.resolve()
    assert data_card("squiggles", examples=2).manifest == card.manifest
    box = tmp_path / "box-data"
    (box / "squiggles").mkdir(parents=True)
    monkeypatch.setenv("CHOLINE_DATA_DIR", str(box))  # on a box, the agent's synced folder wins
    assert choline.data("squiggles") == box / "squiggles"


def test_the_agent_recognises_the_bundle_by_the_same_names(saved: Any, tmp_path: Path) -> None:
    from choline_agent import artifacts

    _, bundle = saved
    assert artifacts.BUNDLE_SUFFIX == SUFFIX and artifacts.CARD == "card.json"
    chosen, left = artifacts.collect(tmp_path, {}, [(bundle.tarball, None)], 10**9, tmp_path / "scratch")
    names = {i.name for i in chosen if i.bundle}
    assert f"squiggles{SUFFIX}" in names and not left


def test_the_digits_example_saves_a_complete_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("digits_train", REPO / "examples" / "digits" / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--epochs", "1", "--run-dir", str(tmp_path / "run")]) == 0
    run_dir = tmp_path / "run"
    b = load_bundle(run_dir / f"digits{SUFFIX}", extract_to=tmp_path / "unpacked")
    card = b.card
    assert card["purpose"].startswith("Recognise a handwritten digit")
    assert card["inputs"] == [
        {
            "name": "pixels",
            "dtype": "float32",
            "shape": [64],
            "range": [0, 16],
            "description": card["inputs"][0]["description"],
        }
    ]
    assert card["outputs"][0]["labels"] == [str(i) for i in range(10)]
    assert [s["op"] for s in card["preprocessing"]] == ["normalize"] and len(card["preprocessing"][0]["mean"]) == 64
    data = card["training"]["data"][0]
    assert data["name"] == "sklearn digits" and data["examples"] == 1797 and data["manifest"].startswith("sha256:")
    assert data["splits"] == {"train": 1437, "validation": 360} and data["size_bytes"] > 0
    assert set(card["metrics"]["final"]) >= {"val/accuracy", "val/loss"} and card["metrics"]["best"]["val/accuracy"]
    assert card["training"]["run_id"] and card["training"]["step"] == 45
    assert card["code"]["digest"] and card["model"]["code"] == ["code/model.py"]
    assert set(card["environment"]) >= {"python", "torch", "packages"}
    # raw pixels through the bundle give the model's outputs on the normalized data it trained on
    from sklearn.datasets import load_digits

    raw = torch.tensor(load_digits().data[:7], dtype=torch.float32)
    x, _, train_idx, _ = module.load(0)
    mean, std = module.stats(x, train_idx)
    weights = b.model.state_dict()
    net = module.model()
    net.load_state_dict(weights)
    assert torch.equal(b.predict(raw), net.eval()((raw - mean) / std))
