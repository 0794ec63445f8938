"""Push and pull through a real control plane (gateway, syncer, NATS, S3): round trip, deduplication across
files and versions, deltas both ways, corrupted chunks, and what is refused."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from choline.datasets.fetch import read_state
from choline.datasets.pull import pull
from choline.datasets.push import push
from choline.datasets.remote import DatasetRemote
from choline.datasets.state import LocalState
from choline_core.errors import UserError
from choline_core.pipeline import DatasetManifest, manifest_key, pack_key
from choline_core.storage import S3Store

from .conftest import make_tree, snapshot

pytestmark = [pytest.mark.slow]


def test_round_trip_identical_bytes_modes_links(
    tmp_path: Path, remote: DatasetRemote, state: LocalState, objects: S3Store
) -> None:
    src = make_tree(tmp_path / "src")
    pushed = push(src, "roundtrip", remote, state=state)
    assert pushed.files == 45 and pushed.packs_sent >= 1
    # content-addressed: the manifest is stored under its digest, the packs under theirs
    raw = objects.get_bytes(manifest_key("roundtrip", pushed.manifest))
    manifest = DatasetManifest.from_bytes(raw, pushed.manifest)
    assert all(objects.exists(pack_key(p)) for p in manifest.packs)
    info, got = pull("roundtrip", tmp_path / "dst", remote)
    assert info.manifest == pushed.manifest
    assert snapshot(tmp_path / "dst") == snapshot(src)
    # every unique chunk crossed the network once: the duplicate file's bytes did not
    dup_size = (src / "images" / "dup.jpg").stat().st_size
    assert got.fetched_bytes == got.size - dup_size and got.refetched == 0
    # the duplicate file was stored once
    dup = {c[3] for f in manifest.files if f.path in ("images/dup.jpg", "images/train/001.jpg") for c in f.chunks}
    assert len(dup) == 1


def test_second_version_moves_only_changed_chunks_both_ways(
    tmp_path: Path, remote: DatasetRemote, state: LocalState
) -> None:
    src = make_tree(tmp_path / "src", seed=2)
    first = push(src, "versions", remote, state=state)
    pull("versions", tmp_path / "dst", remote)
    # an insert in the middle of a big file, a new small file, a removed one
    big = src / "big1.bin"
    data = big.read_bytes()
    big.write_bytes(data[: len(data) // 2] + random.Random(7).randbytes(5000) + data[len(data) // 2 :])
    (src / "images" / "train" / "new.jpg").write_bytes(b"x" * 3000)
    (src / "images" / "train" / "002.jpg").unlink()
    second = push(src, "versions", remote, state=state)
    assert second.manifest != first.manifest
    assert second.bytes_sent < 600_000, second  # a few chunks around the insert, the new file, the manifest
    assert second.new_chunks <= 8
    info, got = pull("versions", tmp_path / "dst", remote)
    assert info.manifest == second.manifest
    assert snapshot(tmp_path / "dst") == snapshot(src)
    # the untouched files stayed; the edited one was rebuilt from its own old chunks plus a few new ones
    assert got.fetched_bytes < 300_000 and got.skipped_bytes > 6_000_000 and got.local_bytes > 2_500_000, got
    # an older version is still there to pull, and shares the unchanged chunks
    _, old = pull("versions", tmp_path / "old", remote, version=first.manifest[:10])
    assert old.size == first.size
    # pushing the same tree again sends nothing but a lookup
    again = push(src, "versions", remote, state=state)
    assert (again.manifest, again.packs_sent, again.bytes_sent) == (second.manifest, 0, 0)


def test_corrupted_local_chunk_is_fetched_instead(tmp_path: Path, remote: DatasetRemote, state: LocalState) -> None:
    src = make_tree(tmp_path / "src", seed=3)
    push(src, "heal", remote, state=state)
    pull("heal", tmp_path / "dst", remote)
    # damage a file on disk without changing its size, change another in the source and push
    victim = tmp_path / "dst" / "big2.bin"
    raw = bytearray(victim.read_bytes())
    raw[1000] ^= 0xFF
    victim.write_bytes(bytes(raw))
    (src / "run.sh").write_text("#!/bin/sh\necho changed\n")
    push(src, "heal", remote, state=state)
    _, got = pull("heal", tmp_path / "dst", remote)
    assert snapshot(tmp_path / "dst") == snapshot(src)
    assert got.fetched_bytes > 0


def test_pull_refuses_a_folder_with_other_files(tmp_path: Path, remote: DatasetRemote, state: LocalState) -> None:
    src = make_tree(tmp_path / "src", seed=4, big=1000, small=3)
    push(src, "guarded", remote, state=state)
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        pull("guarded", dest, remote)
    assert (dest / "notes.txt").read_text() == "keep me"


def test_push_refuses_links_out_of_the_folder(tmp_path: Path, remote: DatasetRemote, state: LocalState) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.txt").write_text("fine")
    (tmp_path / "secret").write_text("outside")
    (src / "escape").symlink_to("../secret")
    with pytest.raises(UserError, match="outside the dataset"):
        push(src, "leaky", remote, state=state)
    (src / "escape").unlink()
    (src / "abs").symlink_to(tmp_path / "secret")
    with pytest.raises(UserError, match="outside the dataset"):
        push(src, "leaky", remote, state=state)
    (src / "abs").unlink()
    os.mkfifo(src / "pipe")
    with pytest.raises(UserError, match="FIFO"):
        push(src, "leaky", remote, state=state)


def test_state_records_the_version(tmp_path: Path, remote: DatasetRemote, state: LocalState) -> None:
    src = make_tree(tmp_path / "src", seed=5, big=1000, small=2)
    pushed = push(src, "recorded", remote, state=state)
    pull("recorded", tmp_path / "dst", remote)
    recorded, manifest = read_state(tmp_path / "dst")
    assert recorded["manifest"] == pushed.manifest and manifest is not None
