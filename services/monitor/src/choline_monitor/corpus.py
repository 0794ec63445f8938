"""The frozen evaluation corpus: recorded training runs with labels, and how to replay them.

The files live in ``services/monitor/corpus/`` (``runs.jsonl.gz`` and ``manifest.json``, written by
``corpus/record.py freeze``). One JSON line per run::

    {"run_id", "kind", "split": "tune"|"heldout", "labels": {detector: onset step}, "allow": [detector],
     "spec": {...}, "started_at": epoch seconds, "hb_interval_s",
     "metrics": {key: [[step, t, value, epoch], ...]},      # value: number or "nan"/"inf"/"-inf"
     "heartbeats": [[t, step, phase, cpu_percent, rss_mb, util, mem_total_mb], ...],
     "end": {"t", "exit_code", "reason", "last_step", "traceback_tail"}}

``t`` is seconds since ``started_at``. ``labels`` empty = a healthy run. ``allow`` names detectors
that may also fire on a broken run without counting against precision (a learning rate that makes
the loss diverge also makes it spike).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from choline_core.errors import NotFound
from choline_core.events import AttemptEnded, GpuReport, Heartbeat, MetricBatch, MetricPoint

from .config import MonitorConfig
from .detectors import Beat, End, GpuUtil, Point
from .watch import Finding, RunWatch

CORPUS_DIR = Path(__file__).resolve().parents[2] / "corpus"
SPLITS = ("tune", "heldout")


@dataclass
class CorpusRun:
    run_id: str
    kind: str
    split: str
    labels: dict[str, int]
    allow: list[str]
    spec: dict[str, Any]
    started_at: float
    metrics: dict[str, list[list[Any]]]
    heartbeats: list[list[Any]]
    end: dict[str, Any]

    @property
    def healthy(self) -> bool:
        return not self.labels

    @property
    def box_id(self) -> str:
        return f"box-{self.run_id}"

    def observations(self) -> list[tuple[float, int, Point | Beat | End]]:
        """Points, heartbeats and the end, in time order (ties: points, then beats, then the end)."""
        items: list[tuple[float, int, Point | Beat | End]] = []
        t0 = self.started_at
        for key, rows in self.metrics.items():
            for step, t, v, epoch in rows:
                if isinstance(v, str):
                    items.append((t0 + t, 0, Point(step, key, None, t0 + t, 1, v, epoch)))
                else:
                    items.append((t0 + t, 0, Point(step, key, float(v), t0 + t, 1, None, epoch)))
        for t, step, phase, cpu, _rss, util, _mem in self.heartbeats:
            items.append((t0 + t, 1, Beat(t0 + t, step, phase, (GpuUtil(0, util),), cpu, 1)))
        e = self.end
        items.append(
            (t0 + e["t"], 2, End(t0 + e["t"], 1, e["reason"], e["exit_code"], e["last_step"], e["traceback_tail"]))
        )
        items.sort(key=lambda x: (x[0], x[1]))
        return items

    def events(self) -> Iterator[tuple[float, MetricBatch | Heartbeat | AttemptEnded]]:
        """The run as the agent would have sent it: a metric batch before each heartbeat, then the end."""
        seq = 0
        pending: list[MetricPoint] = []
        hb_seq = 0

        def flush() -> MetricBatch:
            batch = MetricBatch(run_id=self.run_id, attempt=1, points=list(pending))
            pending.clear()
            return batch

        for t, _order, obs in self.observations():
            if isinstance(obs, Point):
                seq += 1
                pending.append(
                    MetricPoint(
                        seq=seq,
                        step=obs.step,
                        key=obs.key,
                        value=obs.value,
                        raw=obs.raw,
                        ts=datetime.fromtimestamp(obs.t, timezone.utc),
                        epoch=obs.epoch,
                    )
                )
                continue
            if pending:
                yield pending[-1].ts.timestamp(), flush()
            if isinstance(obs, Beat):
                hb_seq += 1
                rec = self.heartbeats[hb_seq - 1]
                yield (
                    t,
                    Heartbeat(
                        box_id=self.box_id,
                        run_id=self.run_id,
                        attempt=1,
                        agent_version="corpus",
                        seq=hb_seq,
                        step=obs.step,
                        phase=obs.phase,
                        cpu_percent=obs.cpu_percent,
                        mem_used_mb=rec[4],
                        gpus=[
                            GpuReport(
                                index=0, name="cpu-duty-cycle", util=rec[5], mem_used_mb=rec[4], mem_total_mb=rec[6]
                            )
                        ],
                    ),
                )
            else:
                yield (
                    t,
                    AttemptEnded(
                        run_id=self.run_id,
                        attempt=1,
                        box_id=self.box_id,
                        reason=obs.reason,
                        exit_code=obs.exit_code,
                        last_step=obs.last_step,
                        traceback_tail=obs.traceback_tail,
                    ),
                )
        if pending:
            yield pending[-1].ts.timestamp(), flush()

    def onset_time(self, step: int) -> float:
        """When the run reached ``step`` (its first metric point at or after it)."""
        best: float | None = None
        for rows in self.metrics.values():
            for s, t, _v, _e in rows:
                if s >= step and (best is None or t < best):
                    best = t
                    break
        return self.started_at + (best if best is not None else self.end["t"])


def load_manifest(path: Path | None = None) -> dict[str, Any]:
    folder = path or CORPUS_DIR
    try:
        return dict(json.loads((folder / "manifest.json").read_text()))
    except OSError as exc:
        raise NotFound(
            f"no evaluation corpus at {folder}", hint="record one: python services/monitor/corpus/record.py"
        ) from exc


def load_corpus(split: str | None = None, path: Path | None = None, *, verify: bool = True) -> list[CorpusRun]:
    """The corpus runs (of one split, or all), checked against the manifest's digest."""
    folder = path or CORPUS_DIR
    manifest = load_manifest(folder)
    data = (folder / manifest["file"]).read_bytes()
    if verify and hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise ValueError(f"{folder / manifest['file']} does not match its manifest's sha256")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    runs = []
    for line in gzip.decompress(data).decode().splitlines():
        r = json.loads(line)
        if split is not None and r["split"] != split:
            continue
        runs.append(
            CorpusRun(
                run_id=r["run_id"],
                kind=r["kind"],
                split=r["split"],
                labels={k: int(v) for k, v in r["labels"].items()},
                allow=list(r["allow"]),
                spec=r["spec"],
                started_at=float(r["started_at"]),
                metrics=r["metrics"],
                heartbeats=r["heartbeats"],
                end=r["end"],
            )
        )
    return runs


def replay(
    run: CorpusRun, config: MonitorConfig | None = None, *, events: bool = False
) -> tuple[list[Finding], RunWatch]:
    """Run the detectors over a recorded run; returns its findings and the watch (for its counters).

    ``events=True`` goes through the real event path (``MetricBatch``/``Heartbeat``/``AttemptEnded``
    through ``RunWatch.feed_*``, as the service does); the default feeds the same observations
    straight to the detectors, which is several times faster and gives the same findings.
    """
    watch = RunWatch(run.run_id, config)
    watch.trace = []
    findings: list[Finding] = []
    if events:
        for t, ev in run.events():
            if isinstance(ev, MetricBatch):
                findings += watch.feed_batch(ev)
            elif isinstance(ev, Heartbeat):
                findings += watch.feed_heartbeat(ev, t)
            else:
                findings += watch.feed_end(ev, t)
        return findings, watch
    watch.attempt = 1
    for _t, _o, obs in run.observations():
        if isinstance(obs, Point):
            findings += watch.observe_point(obs)
        elif isinstance(obs, Beat):
            findings += watch.observe_beat(obs)
        else:
            findings += watch.observe_end(obs)
    return findings, watch
