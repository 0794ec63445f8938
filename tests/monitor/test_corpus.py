"""The frozen evaluation corpus: it loads, matches its manifest, has its labels and its split."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from functools import lru_cache
from pathlib import Path

import pytest

from choline_core.errors import NotFound
from choline_monitor.config import MonitorConfig
from choline_monitor.corpus import CORPUS_DIR, CorpusRun, load_corpus, load_manifest, replay
from choline_monitor.detectors import DETECTOR_NAMES


@lru_cache(maxsize=1)
def corpus() -> tuple[CorpusRun, ...]:
    return tuple(load_corpus())


def test_manifest_matches_the_runs() -> None:
    manifest = load_manifest()
    runs = corpus()
    assert manifest["runs"] == len(runs) >= 100
    assert manifest["points"] == sum(len(v) for r in runs for v in r.metrics.values())
    by_kind = Counter((r.kind, r.split) for r in runs)
    for kind, counts in manifest["kinds"].items():
        assert counts == {"tune": by_kind[(kind, "tune")], "heldout": by_kind[(kind, "heldout")]}
    size = (CORPUS_DIR / manifest["file"]).stat().st_size
    assert 100_000 < size < 10_000_000


def test_every_run_has_a_split_labels_and_a_whole_stream() -> None:
    ids = set()
    for r in corpus():
        assert r.run_id not in ids
        ids.add(r.run_id)
        assert r.split in ("tune", "heldout")
        assert set(r.labels) <= set(DETECTOR_NAMES) and set(r.allow) <= set(DETECTOR_NAMES)
        steps = [s for s, _t, _v, _e in r.metrics["loss"]]
        assert steps == sorted(steps) and steps[0] >= 1
        for d, onset in r.labels.items():
            assert 0 <= onset <= max(steps), (r.run_id, d, onset)
        assert r.heartbeats and r.end["exit_code"] is not None
        if r.kind == "healthy" and not r.labels:
            # a moderate slowdown by the shared machine is the only "either answer" on a healthy run
            assert r.end["exit_code"] == 0 and set(r.allow) <= {"throughput"}


def test_both_halves_have_every_kind_and_enough_healthy_runs() -> None:
    runs = corpus()
    for split in ("tune", "heldout"):
        half = [r for r in runs if r.split == split]
        assert {r.kind for r in half} == {r.kind for r in runs}
        assert sum(r.healthy for r in half) >= 40
        labelled = Counter(d for r in half for d in r.labels)
        assert set(labelled) == set(DETECTOR_NAMES), labelled
    assert [r.run_id for r in load_corpus("tune")] == [r.run_id for r in runs if r.split == "tune"]


def test_a_corpus_that_does_not_match_its_manifest_is_refused(tmp_path: Path) -> None:
    manifest = load_manifest()
    shutil.copy(CORPUS_DIR / manifest["file"], tmp_path / manifest["file"])
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "sha256": "0" * 64}))
    with pytest.raises(ValueError, match="sha256"):
        load_corpus(path=tmp_path)
    with pytest.raises(NotFound):
        load_corpus(path=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split"):
        load_corpus("test")


@pytest.mark.slow
def test_the_event_path_finds_what_the_fast_path_finds() -> None:
    seen: set[str] = set()
    sample = []
    for r in load_corpus("tune"):  # one run of each kind
        if r.kind not in seen:
            seen.add(r.kind)
            sample.append(r)
    config = MonitorConfig()
    for r in sample:
        fast, _ = replay(r, config)
        slow, _ = replay(r, config, events=True)
        assert [(f.id, f.step, f.message) for f in slow] == [(f.id, f.step, f.message) for f in fast], r.run_id


@pytest.mark.slow
def test_each_detector_catches_labelled_tuning_runs() -> None:
    caught: Counter[str] = Counter()
    for r in load_corpus("tune"):
        if not r.labels:
            continue
        found, _ = replay(r)
        for d, onset in r.labels.items():
            if any(f.detector == d and (f.step is None or f.step >= onset) for f in found):
                caught[d] += 1
    assert set(caught) == set(DETECTOR_NAMES)
