"""Gathering what the advisor needs about a run, from the services and places that own it.

The monitor reads no other service's tables. It asks and reads:

- the provisioner (``get_run`` over NATS): the run's spec (script, args, env, GPUs, data) and attempts;
- the bus's own streams, read with short-lived ephemeral consumers filtered to the run's subjects:
  ``METRICS`` (the metric points), ``LOGS`` (the last lines of output), ``RUNS`` (the attempts'
  environment reports: Python and torch);
- object storage: the code bundle (``code/<sha>.tar.gz``: the script's relevant lines), the
  environment spec (``envs/<sha>.json``: requirements), a finished attempt's full log
  (``runs/<run>/logs/attempt-<n>.txt``) when the stream no longer has it, the dataset's
  manifest (``data/<name>/manifest/<sha>``: files, types, class folders) and the first bytes of
  a CSV (its header);
- the syncer (``datasets`` over NATS): the dataset's size and version.

Every part is best effort with its own time limit: what cannot be had becomes a note in the
context ("logs: not available (...)"), never an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import re
import tarfile
from collections import Counter, deque
from datetime import datetime, timedelta
from pathlib import PurePosixPath
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import api as js_api

from choline_core import pipeline, rpc
from choline_core.bus import Bus
from choline_core.events import Envelope, LogBatch, MetricBatch
from choline_core.pipeline import EnvironmentReady
from choline_core.storage import ObjectStore

from .context import DatasetCard, MetricSummary, RunMaterial

log = logging.getLogger(__name__)

MAX_CODE_BYTES = 64 << 20
MAX_FILE_CHARS = 200_000
IMAGE = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
AUDIO = {".wav", ".mp3", ".flac", ".ogg", ".m4a"}
TEXT = {".txt", ".json", ".jsonl", ".md", ".xml", ".html"}
TABULAR = {".csv", ".tsv", ".parquet", ".feather", ".arrow"}
ARRAYS = {".npy", ".npz", ".pt", ".pth", ".safetensors", ".h5", ".hdf5", ".pkl"}
VIDEO = {".mp4", ".avi", ".mov", ".mkv", ".webm"}
SPLITS = {"train", "training", "val", "valid", "validation", "test", "testing", "dev"}


async def read_subject(bus: Bus, subject: str, *, max_msgs: int = 2000, timeout: float = 5.0) -> list[Envelope]:
    """The newest ``max_msgs`` messages on ``subject`` (and its first, when more were skipped), in order.

    An ephemeral consumer (no acks, in memory, deleted at the end) filtered to the subject. When
    the subject holds more than ``max_msgs`` messages, reading starts at the time where about
    that many remain (message times are interpolated between the first and the last)."""
    js = bus.js
    stream = bus.subjects.stream_for(subject)
    try:
        last = await js.get_last_msg(stream, subject)
    except nats.js.errors.NotFoundError:
        return []
    last_seq = int(last.seq or 0)
    deadline = asyncio.get_running_loop().time() + timeout
    out: deque[Envelope] = deque(maxlen=max_msgs)
    first: Envelope | None = None

    async def consume(config: js_api.ConsumerConfig, limit: int | None) -> int:
        """Read into ``out``; returns how many were pending (nothing is read when over ``limit``)."""
        sub = await js.pull_subscribe(subject, stream=stream, config=config)
        name = None
        try:
            info = await sub.consumer_info()
            name = info.name
            pending = int(info.num_pending or 0)
            if limit is not None and pending > limit:
                return pending
            got = 0
            loop = asyncio.get_running_loop()
            while got < pending and loop.time() < deadline:
                want = min(256, pending - got)  # never more than is there: a short fetch waits out its timeout
                try:
                    msgs = await sub.fetch(want, timeout=max(0.1, min(2.0, deadline - loop.time())))
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    break
                done = False
                for msg in msgs:
                    got += 1
                    try:
                        out.append(Envelope.parse(msg.data))
                    except ValueError:
                        continue
                    if msg.metadata.sequence.stream >= last_seq:
                        done = True
                if done:
                    break
            return pending
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            if name:
                with contextlib.suppress(Exception):
                    await js.delete_consumer(stream, name)

    def config(**kw: Any) -> js_api.ConsumerConfig:
        return js_api.ConsumerConfig(
            ack_policy=js_api.AckPolicy.NONE, inactive_threshold=30.0, mem_storage=True, filter_subject=subject, **kw
        )

    pending = await consume(config(deliver_policy=js_api.DeliverPolicy.ALL), max_msgs)
    if pending > max_msgs and len(out) == 0:
        # too many: read the first message, then start where about max_msgs remain
        head = await js.get_msg(stream, seq=1, subject=subject, next=True)
        with contextlib.suppress(ValueError):
            first = Envelope.parse(head.data or b"")
        t0, t1 = head.time, last.time
        start: datetime | None = None
        if t0 is not None and t1 is not None and t1 > t0:
            start = t1 - (t1 - t0) * min(1.0, 1.2 * max_msgs / pending)
        elif t1 is not None:
            start = t1 - timedelta(minutes=30)
        policy = {"deliver_policy": js_api.DeliverPolicy.BY_START_TIME, "opt_start_time": start} if start else {}
        await consume(config(**policy) if policy else config(deliver_policy=js_api.DeliverPolicy.ALL), None)
    result = list(out)
    if first is not None and (not result or result[0].id != first.id):
        result.insert(0, first)
    return result


class Sources:
    """Fills a ``RunMaterial`` for a run; each part in parallel, each with its own time limit."""

    def __init__(
        self,
        bus: Bus | None,
        objects: ObjectStore | None,
        *,
        rpc_timeout: float = 5.0,
        read_timeout: float = 6.0,
        max_metric_batches: int = 3000,
        max_log_batches: int = 400,
        log_lines: int = 300,
    ) -> None:
        self.bus = bus
        self.objects = objects
        self.rpc_timeout = rpc_timeout
        self.read_timeout = read_timeout
        self.max_metric_batches = max_metric_batches
        self.max_log_batches = max_log_batches
        self.log_lines = log_lines

    async def gather(
        self,
        run_id: str,
        *,
        question: str | None = None,
        finding: dict[str, Any] | None = None,
        findings: list[dict[str, Any]] | None = None,
    ) -> RunMaterial:
        m = RunMaterial(run_id=run_id, question=question, finding=finding, findings=list(findings or []))
        await self._part(m, "run configuration", self._run(m))
        await asyncio.gather(
            self._part(m, "metrics", self._metrics(m)),
            self._part(m, "logs", self._logs(m)),
            self._part(m, "training script", self._code(m)),
            self._part(m, "environment", self._environment(m)),
            self._part(m, "dataset", self._datasets(m)),
        )
        m.traceback = self._traceback(m)
        return m

    async def _part(self, m: RunMaterial, what: str, work: Any) -> None:
        try:
            await asyncio.wait_for(work, timeout=self.read_timeout + self.rpc_timeout)
        except Exception as exc:  # the advisor does with less; the reason goes into the context
            text = str(exc) or type(exc).__name__
            log.info("advisor: %s of %s not available: %s", what, m.run_id, text, extra={"run_id": m.run_id})
            m.notes.append(f"{what}: not available ({text[:160]})")

    # ------------------------------------------------------------------ the run
    async def _request(self, service: str, method: str, request: Any, reply: type[Any]) -> Any:
        assert self.bus is not None
        env = await self.bus.request(self.bus.subjects.rpc(service, method), request, timeout=self.rpc_timeout)
        rpc.raise_for_error(env)
        if env.type != reply.TYPE:
            raise ValueError(f"the {service} answered {method} with {env.type!r}")
        return env.event(reply)

    async def _run(self, m: RunMaterial) -> None:
        if self.bus is None:
            raise RuntimeError("no bus")
        m.run = await self._request(rpc.PROVISIONER, rpc.GET_RUN, rpc.RunQuery(run_id=m.run_id), rpc.RunInfo)

    # ------------------------------------------------------------------ metrics and logs
    async def _metrics(self, m: RunMaterial) -> None:
        if self.bus is None:
            return
        subject = self.bus.subjects.run_metrics(m.run_id)
        envs = await read_subject(self.bus, subject, max_msgs=self.max_metric_batches, timeout=self.read_timeout)
        per_key: dict[str, dict[int, tuple[int, float | None]]] = {}
        newest = 0
        for env in envs:
            try:
                batch = env.event(MetricBatch)
            except ValueError:
                continue
            if batch.attempt < newest:
                continue  # an older attempt's late points: no longer the run's history
            newest = batch.attempt
            for p in batch.points:
                value = p.value if p.value is not None and math.isfinite(p.value) else None
                per_key.setdefault(p.key, {})[p.step] = (batch.attempt, value)
        for key, pts in list(per_key.items())[:80]:
            m.metrics[key] = MetricSummary.of(key, [(s, v) for s, (_, v) in pts.items()])

    async def _logs(self, m: RunMaterial) -> None:
        lines: deque[str] = deque(maxlen=self.log_lines)
        if self.bus is not None:
            envs = await read_subject(
                self.bus, self.bus.subjects.run_logs(m.run_id), max_msgs=self.max_log_batches, timeout=self.read_timeout
            )
            attempt = None
            for env in envs:
                try:
                    batch = env.event(LogBatch)
                except ValueError:
                    continue
                if attempt is not None and batch.attempt != attempt:
                    lines.append(f"--- attempt {batch.attempt} ---")
                attempt = batch.attempt
                for line in sorted(batch.lines, key=lambda x: x.seq):
                    lines.append(("[choline] " if line.stream == "agent" else "") + line.text.rstrip())
        if not lines and self.objects is not None and m.run is not None and m.run.attempts:
            n = m.run.attempts[-1].attempt
            key = pipeline.logs_key(m.run_id, n)
            info = await asyncio.to_thread(self.objects.stat, key)
            start = max(0, info.size - 48_000)
            raw = await asyncio.to_thread(self.objects.get_bytes, key, start)
            text = raw.decode(errors="replace").splitlines()
            lines.extend(text[1:] if start else text)
        m.logs = list(lines)

    def _traceback(self, m: RunMaterial) -> str | None:
        ev = (m.finding or {}).get("evidence") or {}
        for key in ("traceback_tail", "traceback"):
            if isinstance(ev.get(key), str) and ev[key].strip():
                return str(ev[key])
        if m.run is not None and m.run.attempts:
            a = m.run.attempts[-1]
            if a.error and (a.exit_code not in (0, None) or "Traceback" in a.error):
                return a.error
        head = "Traceback (most recent call last):"
        for i in range(len(m.logs) - 1, -1, -1):
            if m.logs[i].strip().startswith(head):
                block = [m.logs[i]]
                for line in m.logs[i + 1 : i + 80]:
                    block.append(line)
                    if line and not line[:1].isspace() and not line.startswith(head) and ":" in line:
                        break  # the exception line ends the traceback
                return "\n".join(block)
        return None

    # ------------------------------------------------------------------ code and environment
    async def _code(self, m: RunMaterial) -> None:
        if self.objects is None or m.run is None or not m.run.spec.code_digest:
            return
        key = pipeline.code_key(m.run.spec.code_digest)
        info = await asyncio.to_thread(self.objects.stat, key)
        if info.size > MAX_CODE_BYTES:
            m.notes.append(f"training script: the code bundle is {info.size >> 20} MB, not read")
            return
        raw = await asyncio.to_thread(self.objects.get_bytes, key)
        script = m.run.spec.script
        tb = (m.finding or {}).get("evidence", {}).get("traceback_tail") or ""
        if m.run.attempts and m.run.attempts[-1].error:
            tb += "\n" + (m.run.attempts[-1].error or "")
        wanted = _traceback_files(tb)
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
            members = {mem.name.lstrip("./"): mem for mem in tar.getmembers() if mem.isfile()}

            def text(name: str) -> str | None:
                f = tar.extractfile(members[name])
                return f.read(MAX_FILE_CHARS).decode(errors="replace") if f else None

            if script in members:
                m.script_path, m.script = script, text(script)
            for path in wanted:
                match = _member_for(path, members)
                if match and match != script and match not in m.files and len(m.files) < 2:
                    body = text(match)
                    if body is not None:
                        m.files[match] = body

    async def _environment(self, m: RunMaterial) -> None:
        env: dict[str, Any] = {}
        if self.bus is not None:
            envs = await read_subject(self.bus, self.bus.subjects.run_events(m.run_id), max_msgs=500, timeout=3.0)
            for e in envs:
                if e.type == EnvironmentReady.TYPE:
                    with contextlib.suppress(ValueError):
                        ready = e.event(EnvironmentReady)
                        env["python"] = ready.python
                        env["torch"] = f"{ready.torch or 'none'} ({ready.torch_source})"
        if self.objects is not None and m.run is not None and m.run.spec.env_digest:
            spec = await asyncio.to_thread(self.objects.get_json, pipeline.env_key(m.run.spec.env_digest))
            reqs = spec.get("requirements") or []
            env["requirements"] = ", ".join(str(r) for r in reqs[:40]) + (" ..." if len(reqs) > 40 else "")
            if spec.get("python") and "python" not in env:
                env["python (laptop)"] = spec["python"]
        if m.run is not None:
            env["gpus"] = m.run.gpus or m.run.spec.gpus
        m.environment = env

    # ------------------------------------------------------------------ datasets
    async def _datasets(self, m: RunMaterial) -> None:
        if m.run is None:
            return
        for mount in m.run.spec.data[:3]:
            card = DatasetCard(name=mount.name, manifest=mount.manifest)
            m.datasets.append(card)
            if self.bus is not None:
                with contextlib.suppress(Exception):
                    found = await self._request(
                        rpc.SYNCER,
                        pipeline.SYNCER_DATASETS,
                        pipeline.DatasetsQuery(owner=m.run.owner, name=mount.name),
                        pipeline.DatasetList,
                    )
                    for ds in found.datasets:
                        versions = ds.versions or [ds.latest]
                        v = next((x for x in versions if mount.manifest and x.manifest == mount.manifest), ds.latest)
                        card.size, card.files = v.size, v.files
                        card.manifest = card.manifest or v.manifest
            if self.objects is not None and card.manifest:
                await self._manifest_card(card)

    async def _manifest_card(self, card: DatasetCard) -> None:
        assert self.objects is not None and card.manifest
        raw = await asyncio.to_thread(self.objects.get_bytes, pipeline.manifest_key(card.name, card.manifest))
        manifest = pipeline.DatasetManifest.from_bytes(raw)
        describe(card, manifest)
        csv = next((f for f in manifest.files if f.path.lower().endswith((".csv", ".tsv")) and f.chunks), None)
        if csv is not None:
            pack, offset, length, _ = csv.chunks[0]
            head = await asyncio.to_thread(
                self.objects.get_bytes, pipeline.pack_key(manifest.packs[pack]), offset, min(length, 4096)
            )
            first = head.decode(errors="replace").splitlines()[:1]
            if first:
                sep = "\t" if csv.path.lower().endswith(".tsv") else ","
                card.columns = [c.strip().strip('"') for c in first[0].split(sep)][:60]
                card.notes.append(f"header of {csv.path}")


def describe(card: DatasetCard, manifest: pipeline.DatasetManifest) -> None:
    """Size, file types, modality, splits and class folders of a dataset from its manifest alone."""
    files = manifest.files
    card.size = card.size if card.size is not None else manifest.size
    card.files = card.files if card.files is not None else len(files)
    exts = Counter(PurePosixPath(f.path).suffix.lower() or "(none)" for f in files)
    card.extensions = dict(exts.most_common(12))
    kinds: Counter[str] = Counter()
    for ext, n in exts.items():
        for name, group in (
            ("images", IMAGE),
            ("audio", AUDIO),
            ("text", TEXT),
            ("tabular", TABULAR),
            ("arrays", ARRAYS),
            ("video", VIDEO),
        ):
            if ext in group:
                kinds[name] += n
    if kinds:
        card.modality = ", ".join(k for k, _ in kinds.most_common(3))
    splits: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    for f in files:
        parts = PurePosixPath(f.path).parts
        if len(parts) >= 2 and parts[0].lower() in SPLITS:
            splits[parts[0]] += 1
            parts = parts[1:]
        if len(parts) >= 2 and PurePosixPath(f.path).suffix.lower() in IMAGE | AUDIO | TEXT:
            labels[parts[-2]] += 1
    if len(splits) >= 1:
        card.splits = dict(splits)
    if 2 <= len(labels) <= 1000 and len(labels) < max(3, len(files) // 2):
        card.labels = dict(sorted(labels.items()))


def _traceback_files(tb: str) -> list[str]:
    out: list[str] = []
    for path in re.findall(r'File "([^"]+)", line \d+', tb or ""):
        if "site-packages" in path or path.startswith("<") or "/lib/python" in path:
            continue
        if path not in out:
            out.append(path)
    return out[-4:]


def _member_for(path: str, members: dict[str, Any]) -> str | None:
    """The bundle member a traceback path names (the longest matching suffix)."""
    parts = PurePosixPath(path).parts
    for i in range(len(parts)):
        cand = "/".join(parts[i:])
        if cand in members:
            return cand
    return None
