"""The dataset formats without servers: chunk boundaries that survive inserts, manifests that refuse unsafe
trees, packs that describe themselves, and a materialisation that never writes outside its folder."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from choline.datasets.chunking import chunk_bytes
from choline.datasets.fetch import materialize
from choline.datasets.packs import PackBuilder
from choline.datasets.push import build_manifest
from choline.datasets.tree import scan
from choline_core.errors import BadSpec, UserError
from choline_core.pipeline import (
    PACK_FOOTER,
    DatasetManifest,
    ManifestFile,
    ManifestLink,
    parse_pack_footer,
    parse_pack_index,
)

SHA = "a" * 64


def test_an_insert_moves_only_the_chunks_around_it() -> None:
    data = random.Random(1).randbytes(8 << 20)
    edited = data[: 4 << 20] + b"inserted bytes" * 100 + data[4 << 20 :]
    before = {sha for _, _, sha in chunk_bytes(data)}
    after = [(off, n, sha) for off, n, sha in chunk_bytes(edited)]
    new = [(off, n) for off, n, sha in after if sha not in before]
    assert 1 <= len(new) <= 3, new
    assert sum(n for _, n in new) < 800_000
    sizes = [n for _, n, _ in after[:-1]]
    assert min(sizes) >= 16 * 1024 and max(sizes) <= 256 * 1024
    assert 50_000 < sum(sizes) / len(sizes) < 120_000


@pytest.mark.parametrize(
    "files, links, match",
    [
        ([ManifestFile(path="/etc/passwd", size=0)], [], "unsafe path"),
        ([ManifestFile(path="a/../../x", size=0)], [], "unsafe path"),
        ([ManifestFile(path="a//b", size=0)], [], "unsafe path"),
        ([ManifestFile(path="C:/x", size=0)], [], "unsafe path"),
        ([ManifestFile(path="a", size=0), ManifestFile(path="a", size=0)], [], "two entries"),
        ([ManifestFile(path="l/x", size=0)], [ManifestLink(path="l", target="sub")], "below the link"),
        ([], [ManifestLink(path="l", target="../outside")], "points outside"),
        ([], [ManifestLink(path="d/l", target="../../outside")], "points outside"),
        ([], [ManifestLink(path="l", target="/etc")], "points outside"),
        ([ManifestFile(path="f", size=5, chunks=[(0, 0, 4, SHA)])], [], "size is 5"),
        ([ManifestFile(path="f", size=4, chunks=[(3, 0, 4, SHA)])], [], "outside the dataset's packs"),
    ],
)
def test_unsafe_manifests_are_refused(files: list[ManifestFile], links: list[ManifestLink], match: str) -> None:
    manifest = DatasetManifest(packs=["b" * 64], files=files, links=links)
    with pytest.raises(BadSpec, match=match):
        manifest.validate_tree()
    with pytest.raises(BadSpec, match=match):  # the same check when read from bytes
        DatasetManifest.from_bytes(manifest.to_bytes(), manifest.digest())


def test_manifest_digest_is_content() -> None:
    m = DatasetManifest(packs=["b" * 64], files=[ManifestFile(path="x", size=4, chunks=[(0, 0, 4, SHA)])])
    raw = m.to_bytes()
    assert DatasetManifest.from_bytes(raw, m.digest()) == m
    assert DatasetManifest(packs=list(m.packs), files=list(m.files)).digest() == m.digest()
    with pytest.raises(BadSpec, match="does not match its digest"):
        DatasetManifest.from_bytes(raw, "c" * 64)
    with pytest.raises(BadSpec, match="not readable"):
        DatasetManifest.from_bytes(b"\x1f\x8bgarbage")


def test_pack_describes_itself() -> None:
    b = PackBuilder()
    b.add("1" * 64, b"hello")
    b.add("2" * 64, b"world!")
    pack = b.finish()
    index_len = parse_pack_footer(pack.data[-PACK_FOOTER:])
    body = len(pack.data) - PACK_FOOTER - index_len
    assert parse_pack_index(pack.data[body:-PACK_FOOTER], body) == [("1" * 64, 0, 5), ("2" * 64, 5, 6)]
    with pytest.raises(BadSpec):
        parse_pack_footer(b"x" * PACK_FOOTER)
    with pytest.raises(BadSpec, match="outside the pack"):
        parse_pack_index(b'{"chunks":[["' + b"1" * 64 + b'",0,50]]}', 11)


def test_scan_keeps_inside_links_and_refuses_others(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "f").write_text("x")
    (root / "rel").symlink_to("sub/f")
    (root / "abs").symlink_to(root / "sub" / "f")
    (root / "void").mkdir()
    tree = scan(root)
    assert dict(tree.links) == {"abs": "sub/f", "rel": "sub/f"} and tree.dirs == ["void"]
    (tmp_path / "secret").mkdir()
    (root / "sub" / "out").symlink_to("../../secret")
    with pytest.raises(UserError, match="outside the dataset"):
        scan(root)
    with pytest.raises(UserError, match="no such folder"):
        scan(tmp_path / "nope")


def _local_version(tmp_path: Path) -> tuple[Path, DatasetManifest, bytes]:
    """A folder materialised "by hand" (its own chunks serve as the source), with its manifest."""
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "b").write_bytes(random.Random(3).randbytes(300_000))
    (src / "c").write_bytes(b"tiny")
    os.chmod(src / "c", 0o600)
    tree = scan(src)
    from choline.datasets.chunking import chunk_file

    files = [(f, chunk_file(f.abspath)) for f in tree.files]
    locations = {sha: ("d" * 64, 0, n) for _, cs in files for n, sha in cs}
    manifest = build_manifest(tree, files, locations)
    return src, manifest, manifest.to_bytes()


def test_materialise_never_follows_a_link_out(tmp_path: Path) -> None:
    src, manifest, raw = _local_version(tmp_path)
    # ``src`` itself is the only chunk source: mark it as a materialised copy of this version
    seed = tmp_path / "seed"
    materialize_from(src, seed, manifest, raw)
    dest = tmp_path / "dest"
    (dest / ".choline-dataset").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (dest / "a").symlink_to(outside)  # left by an older version, or planted
    got = materialize(manifest, raw, dest, _no_network, sources=[seed])
    assert got.fetched_bytes == 0 and got.local_bytes == manifest.size
    assert not (dest / "a").is_symlink() and (dest / "a" / "b").read_bytes() == (src / "a" / "b").read_bytes()
    assert list(outside.iterdir()) == []
    assert oct((dest / "c").stat().st_mode & 0o777) == "0o600"


def _no_network(packs: list[str]) -> dict[str, str]:
    raise AssertionError(f"nothing should be fetched, asked for {packs}")


def materialize_from(src: Path, seed: Path, manifest: DatasetManifest, raw: bytes) -> None:
    """Copy ``src`` to ``seed`` and record it as a materialised copy of ``manifest`` (no network)."""
    import json
    import shutil

    shutil.copytree(src, seed, symlinks=True)
    (seed / ".choline-dataset").mkdir()
    (seed / ".choline-dataset" / "manifest.gz").write_bytes(raw)
    (seed / ".choline-dataset" / "state.json").write_text(json.dumps({"manifest": manifest.digest(), "files": {}}))
