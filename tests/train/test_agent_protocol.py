"""The agent protocol: wire encoding both ways, lenient reading, non-finite values, manifest checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from choline_core import agent_protocol as proto


def test_every_message_round_trips() -> None:
    msgs: list[proto.Message] = [
        proto.Hello(pid=12, rank=0, world_size=2, library_version="0.1.0", run_id="r1", attempt=3),
        proto.Metrics(
            points=[
                proto.MetricPoint(seq=0, step=5, key="loss", value=0.5, epoch=1, ts=1.0, attempt=3),
                proto.MetricPoint(seq=1, step=5, key="gn", value=None, raw="inf", ts=1.0, attempt=3, user_step=9),
            ]
        ),
        proto.CheckpointReady(step=40, dir="/x/checkpoints/40", reason="epoch", epoch=1, metrics={"val/loss": None}),
        proto.Status(phase="training", step=7, epoch=0),
        proto.Artifact(path="/x/out.bin"),
        proto.ControlAck(id="c1", ok=True, step=9),
        proto.Uploaded(step=40),
        proto.Control(id="c2", action="set", params={"lr": 3e-4}),
    ]
    for msg in msgs:
        line = msg.to_line()
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert json.loads(line)["type"] == msg.TYPE
        assert proto.decode(line) == msg
    assert set(proto.message_types()) == {m.TYPE for m in msgs}


def test_readers_are_lenient_and_writers_strict() -> None:
    line = b'{"type": "uploaded", "step": 3, "from_the_future": true}'
    assert proto.decode(line) == proto.Uploaded(step=3)
    assert proto.decode(b'{"type": "teleport", "to": "mars"}') is None
    with pytest.raises(ValueError):
        proto.decode(b"[1, 2]")
    with pytest.raises(ValueError):
        proto.decode(b"not json")
    with pytest.raises(ValueError):
        proto.Uploaded(step=3, extra=1)  # type: ignore[call-arg]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 0.25])
def test_non_finite_values_survive_json(value: float) -> None:
    enc, raw = proto.encode_value(value)
    point = proto.MetricPoint(seq=0, step=1, key="k", value=enc, raw=raw, ts=0.0)
    back = proto.decode(proto.Metrics(points=[point]).to_line())
    assert isinstance(back, proto.Metrics)
    got = back.points[0].as_float()
    assert (math.isnan(got) and math.isnan(value)) or got == value


def test_encode_refuses_a_raw_nan() -> None:
    with pytest.raises(ValueError):
        proto.encode(proto.Metrics(points=[proto.MetricPoint(seq=0, step=1, key="k", value=math.nan, ts=0.0)]))


def _write_checkpoint(d: Path) -> None:
    d.mkdir(parents=True)
    (d / "a.bin").write_bytes(b"hello")
    files = [proto.ManifestFile(path="a.bin", size=5, sha256=proto.sha256_file(d / "a.bin"))]
    manifest = proto.CheckpointManifest(step=3, created=0.0, files=files)
    (d / proto.MANIFEST).write_text(manifest.model_dump_json())


def test_verify_checkpoint_finds_each_kind_of_damage(tmp_path: Path) -> None:
    d = tmp_path / "3"
    _write_checkpoint(d)
    assert proto.verify_checkpoint(d).step == 3
    (d / "a.bin").write_bytes(b"hellO")
    with pytest.raises(proto.IncompleteCheckpoint, match="sha256"):
        proto.verify_checkpoint(d)
    assert proto.verify_checkpoint(d, hashes=False).step == 3
    (d / "a.bin").write_bytes(b"hell")
    with pytest.raises(proto.IncompleteCheckpoint, match="4 bytes"):
        proto.verify_checkpoint(d)
    (d / "a.bin").unlink()
    with pytest.raises(proto.IncompleteCheckpoint, match="missing"):
        proto.verify_checkpoint(d)
    (d / proto.MANIFEST).write_text("{trunc")
    with pytest.raises(proto.IncompleteCheckpoint, match="unreadable"):
        proto.verify_checkpoint(d)
    (d / proto.MANIFEST).unlink()
    with pytest.raises(proto.IncompleteCheckpoint, match="never completed"):
        proto.verify_checkpoint(d)


def test_environment_contract_names() -> None:
    assert proto.ENV_VARS == (
        "CHOLINE_RUN_ID",
        "CHOLINE_ATTEMPT",
        "CHOLINE_AGENT_SOCKET",
        "CHOLINE_RUN_DIR",
        "CHOLINE_RESUME_FROM",
        "CHOLINE_DATA_DIR",
        "CHOLINE_CONTROL_LOG",
    )
    assert proto.dataset_dirname("a/b") == "a_b" and proto.dataset_dirname("..") == "_"
