"""Model versions in the syncer: a successful run's bundle becomes a version under the run's owner, the same
bytes twice are one version, and what is not a bundle (or not what was uploaded) is refused with the reason."""

from __future__ import annotations

import hashlib
import io
import tarfile
import urllib.request
from pathlib import Path

import pytest

from choline_core import deploy as c
from choline_core import rpc
from choline_core.errors import BadSpec, NotFound
from choline_core.events import Envelope, RunState, RunStateChanged

from ..syncer.conftest import eventually
from .conftest import DeployPlane

pytestmark = pytest.mark.slow


async def test_a_successful_runs_bundle_becomes_a_version_of_its_owner(
    dplane: DeployPlane, digits_bundle: Path
) -> None:
    bus, sub = dplane.bus, dplane.subjects

    async def get_run(env: Envelope) -> rpc.RunInfo:  # the provisioner's answer: who owns the run
        return _run_info(env.event(rpc.RunQuery).run_id or "")

    await bus.serve(sub.rpc(rpc.PROVISIONER, rpc.GET_RUN), get_run, queue="provisioner")
    dplane.store.put_bytes("runs/r1/artifacts/digits.choline-bundle.tar.gz", digits_bundle.read_bytes())
    dplane.store.put_bytes("runs/r2/artifacts/notes.txt", b"no bundle here")
    for run_id, state in (("r0", RunState.failed), ("r2", RunState.succeeded), ("r1", RunState.succeeded)):
        await bus.publish(sub.run_events(run_id), RunStateChanged(run_id=run_id, state=state))

    async def registered() -> list[c.ModelVersionInfo]:
        found = (await dplane.rpc("syncer", c.MODELS, c.ModelsQuery(cards=True))).event(c.ModelList).models
        return found

    (m,) = await eventually(registered, timeout=30, what="the run's bundle registered")
    assert (m.owner, m.name, m.version, m.run_id, m.source) == ("carol", "digits", 1, "r1", "run")
    assert m.sha256 == hashlib.sha256(digits_bundle.read_bytes()).hexdigest()
    assert m.card["purpose"].startswith("Recognise")
    assert dplane.store.get_bytes(m.key) == digits_bundle.read_bytes()
    # the run's event again (a redelivery): still one version
    await bus.publish(sub.run_events("r1"), RunStateChanged(run_id="r1", state=RunState.succeeded))
    pushed = await dplane.push(digits_bundle, owner="carol")
    assert pushed.version == 1 and pushed.run_id == "r1"
    # another owner does not see it; the newest is what ModelGet gives, with a download URL when asked
    assert (await dplane.rpc("syncer", c.MODELS, c.ModelsQuery(owner="dave"))).event(c.ModelList).models == []
    got = (await dplane.rpc("syncer", c.MODEL_GET, c.ModelGet(name="digits", owner="carol", presign=True))).event(
        c.ModelVersionInfo
    )
    assert got.url and urllib.request.urlopen(got.url, timeout=10).read() == digits_bundle.read_bytes()
    with pytest.raises(NotFound):
        await dplane.rpc("syncer", c.MODEL_GET, c.ModelGet(name="digits", version=2, owner="carol"))


def _run_info(run_id: str) -> rpc.RunInfo:
    from datetime import datetime, timezone

    from choline_core.events import RunSpec

    now = datetime.now(timezone.utc)
    return rpc.RunInfo(
        run_id=run_id, owner="carol", state=RunState.succeeded, spec=RunSpec(script="train.py"),
        created_at=now, updated_at=now,
    )  # fmt: skip


def _tarball(files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return raw.getvalue()


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"not a tarball at all", "not a readable bundle tarball"),
        (_tarball({"x/readme.txt": b"hello"}), "holds no <name>/card.json"),
        (_tarball({"x/card.json": b'{"format": "other/1"}'}), "is not choline-bundle/1"),
        (_tarball({"x/card.json": b'{"format": "choline-bundle/1", "name": "x"}'}), "lacks its purpose or its inputs"),
    ],
    ids=["garbage", "no card", "other format", "no inputs"],
)
async def test_what_is_not_a_bundle_is_refused(dplane: DeployPlane, tmp_path: Path, data: bytes, words: str) -> None:
    path = tmp_path / "x.choline-bundle.tar.gz"
    path.write_bytes(data)
    with pytest.raises(BadSpec, match=words):
        await dplane.push(path)
    assert (await dplane.rpc("syncer", c.MODELS, c.ModelsQuery())).event(c.ModelList).models == []


async def test_an_upload_that_differs_from_its_sha256_is_refused(dplane: DeployPlane, digits_bundle: Path) -> None:
    data = digits_bundle.read_bytes()
    wrong = hashlib.sha256(b"something else").hexdigest()
    up = (await dplane.rpc("syncer", c.MODEL_UPLOAD, c.ModelUploadQuery(sha256=wrong, size=len(data)))).event(
        c.ModelUpload
    )
    assert up.url is not None
    urllib.request.urlopen(urllib.request.Request(up.url, data=data, method="PUT"), timeout=30)
    with pytest.raises(BadSpec, match="does not match its sha256"):
        await dplane.rpc("syncer", c.MODEL_REGISTER, c.ModelRegister(key=up.key, owner="alice", sha256=wrong), 60)
    with pytest.raises(BadSpec, match="only an uploaded bundle"):
        await dplane.rpc("syncer", c.MODEL_REGISTER, c.ModelRegister(key="code/abc.tar.gz", owner="alice"))
