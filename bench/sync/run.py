"""bench/sync: datasets through a real embedded control plane (gateway, syncer, NATS, SeaweedFS S3).

1. First push of a 1 GiB dataset of mixed file sizes (a few large files, tens of medium, hundreds of 1 MB,
   thousands of small ones; random bytes, so nothing deduplicates by luck), cold: no chunk cache, nothing
   stored. Baseline, same run, same server: one raw multipart PUT of the same bytes (one file) with the
   minio client (16 MiB parts, 4 in parallel). Goal: push throughput >= 0.9x the raw PUT's.
2. Re-sync after 100 scattered edits totalling 1 % of the bytes (half inserts, half overwrites, in files
   picked by size): bytes moved (packs and manifest). Goal: <= 3 % of the dataset. For scale: a whole-file
   sync would move every touched file.
3. Box-side fetch of the edited version into an empty folder (parallel ranged GETs on presigned URLs, every
   chunk checked, files materialised) vs a raw GET of the same bytes (the one big object, minio client,
   streamed to a file). Reported, no goal.

The data is generated in a temporary folder and removed at the end. Prints figures, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1 << 30


def make_dataset(root: Path, total: int, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    plan = [(2, 0.15), (20, 0.015), (200, 0.001)]  # (count, fraction of total each); the rest small files
    files: list[Path] = []
    for group, (count, frac) in enumerate(plan):
        d = root / f"group{group}"
        d.mkdir(parents=True)
        for i in range(count):
            p = d / f"f{i:04d}.bin"
            p.write_bytes(rng.randbytes(int(total * frac) + rng.randrange(4096)))
            files.append(p)
    left = total - sum(p.stat().st_size for p in files)
    d = root / "small"
    d.mkdir()
    i = 0
    while left > 0:
        n = min(left, rng.randrange(4 << 10, 128 << 10))
        p = d / f"s{i // 500:02d}" / f"{i:05d}.jpg"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(rng.randbytes(n))
        files.append(p)
        left -= n
        i += 1
    return files


def edit(files: list[Path], total: int, count: int = 100, fraction: float = 0.01, seed: int = 1) -> tuple[int, int]:
    """``count`` edits of ``total * fraction`` bytes in all, half inserts, in files picked by size.
    Returns (bytes edited, bytes of the files touched)."""
    rng = random.Random(seed)
    each = int(total * fraction / count)
    sizes = [p.stat().st_size for p in files]
    touched: set[Path] = set()
    edited = 0
    for k in range(count):
        p = rng.choices(files, weights=sizes)[0]
        while p.stat().st_size < 2 * each:  # every edit its full share, so they add up to the fraction
            p = rng.choices(files, weights=sizes)[0]
        data = p.read_bytes()
        n = each
        at = rng.randrange(0, max(1, len(data) - n))
        new = rng.randbytes(n)
        data = data[:at] + new + (data[at:] if k % 2 == 0 else data[at + n :])  # insert | overwrite
        p.write_bytes(data)
        touched.add(p)
        edited += n
    return edited, sum(p.stat().st_size for p in touched)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=1024)
    args = parser.parse_args()
    total = args.size_mb << 20
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as d:
        tmp = Path(d)
        home, data = tmp / "home", tmp / "data"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHOLINE_")}
        env["CHOLINE_HOME"] = str(home)
        cli = [sys.executable, "-m", "choline.cli.main"]
        subprocess.run([*cli, "up"], env=env, check=True, capture_output=True, timeout=180)
        os.environ.update({"CHOLINE_HOME": str(home)})
        try:
            print(f"generating {args.size_mb} MB of mixed files ...", flush=True)
            files = make_dataset(data, total)
            size = sum(p.stat().st_size for p in files)
            figures = run(tmp, data, files, size)
        finally:
            subprocess.run([*cli, "down"], env=env, capture_output=True, timeout=180)
    goal = "push >= 0.9x raw multipart PUT; re-sync after 1% scattered edits <= 3% of the dataset"
    met = figures["push_vs_raw_put"] >= 0.9 and figures["resync_pct"] <= 3.0
    print(json.dumps({"name": "sync", **figures, "goal": goal, "met": met}))


def run(tmp: Path, data: Path, files: list[Path], size: int) -> dict[str, object]:
    from choline.client import CholineClient
    from choline.datasets.fetch import materialize
    from choline.datasets.push import push
    from choline.datasets.remote import DatasetRemote
    from choline.datasets.state import LocalState
    from choline_core.pipeline import DatasetManifest
    from choline_core.settings import CholineSettings
    from choline_core.storage import S3Store

    settings = CholineSettings()
    objects = S3Store.from_settings(settings)
    mb = size / 1e6
    # baseline: the same bytes as one file, one multipart PUT
    blob = tmp / "blob.bin"
    with open(blob, "wb") as out:
        for p in files:
            out.write(p.read_bytes())
    os.sync()
    t = time.monotonic()
    objects.put_file("bench/raw.bin", blob)
    raw_put_s = time.monotonic() - t
    print(f"raw multipart PUT: {mb:.0f} MB in {raw_put_s:.2f}s ({mb / raw_put_s:.0f} MB/s)", flush=True)

    api = CholineClient.from_settings(settings)
    remote = DatasetRemote(api)
    state = LocalState(tmp / "state.sqlite")
    first = push(data, "bench", remote, state=state)
    print(
        f"first push: {first.files} files, {first.chunks} chunks, {first.packs_sent} packs, "
        f"{first.bytes_sent / 1e6:.0f} MB sent in {first.seconds:.2f}s ({mb / first.seconds:.0f} MB/s)",
        flush=True,
    )
    edited, touched = edit(files, size)
    size2 = sum(p.stat().st_size for p in files)
    second = push(data, "bench", remote, state=state)
    resync_pct = 100.0 * second.bytes_sent / size2
    print(
        f"re-sync after 100 edits ({edited / 1e6:.1f} MB, {100 * edited / size:.2f}%): sent "
        f"{second.bytes_sent / 1e6:.1f} MB ({resync_pct:.2f}%) in {second.seconds:.2f}s; "
        f"a whole-file sync would send {touched / 1e6:.0f} MB ({100 * touched / size2:.1f}%)",
        flush=True,
    )
    # box-side fetch vs a raw GET of the same bytes
    blob.unlink()
    t = time.monotonic()
    objects.get_file("bench/raw.bin", tmp / "raw-get.bin")
    raw_get_s = time.monotonic() - t
    (tmp / "raw-get.bin").unlink()
    first_urls = remote.urls("bench", second.manifest, [])
    raw = remote.get(first_urls.manifest_url, "manifest")
    manifest = DatasetManifest.from_bytes(raw, second.manifest)

    def urls(packs: list[str]) -> dict[str, str]:
        return remote.urls("bench", second.manifest, packs).urls

    got = materialize(manifest, raw, tmp / "box", urls)
    print(
        f"fetch: {got.size / 1e6:.0f} MB in {got.seconds:.2f}s ({got.size / 1e6 / got.seconds:.0f} MB/s, "
        f"{got.requests} ranged GETs); raw GET {mb / raw_get_s:.0f} MB/s",
        flush=True,
    )
    objects.delete("bench/raw.bin")
    remote.close()
    api.close()
    state.close()
    return {
        "dataset_bytes": size,
        "files": first.files,
        "chunks": first.chunks,
        "raw_put_s": round(raw_put_s, 3),
        "push_s": round(first.seconds, 3),
        "push_MBps": round(mb / first.seconds, 1),
        "raw_put_MBps": round(mb / raw_put_s, 1),
        "push_vs_raw_put": round(raw_put_s / first.seconds, 3),
        "edited_bytes": edited,
        "resync_bytes": second.bytes_sent,
        "resync_pct": round(resync_pct, 3),
        "whole_file_pct": round(100 * touched / size2, 2),
        "fetch_MBps": round(got.size / 1e6 / got.seconds, 1),
        "raw_get_MBps": round(mb / raw_get_s, 1),
        "fetch_vs_raw_get": round(raw_get_s / got.seconds * got.size / size, 3),
    }


if __name__ == "__main__":
    main()
