"""One attempt of one run on one box, from the code bundle to ``AttemptEnded``.

``Agent(config).run()``:

1. **fetching**: the code bundle (``code/<digest>.tar.gz``, sha256-checked, unpacked safely into
   ``<workdir>/code``, the script's working directory);
2. **installing**: the environment of ``envs/<digest>.json`` (``envs.build``), published as
   ``EnvironmentReady`` (which torch the run uses, and from where);
3. the newest complete checkpoint of the run, when ``resume`` (``ResumeRequest``; each file's sha256
   checked) into ``<workdir>/resume/<step>``, named in ``CHOLINE_RESUME_FROM``;
4. **training**: the script (``torchrun --nproc_per_node=N`` for N GPUs with ``distributed`` or choline's
   Trainer), its stdout/stderr streamed as ``LogBatch`` and the library's points as ``MetricBatch``, each
   line and point with ``(attempt, seq)``; checkpoints uploaded as the library announces them (files,
   then the manifest, then ``CheckpointUploaded``, then ``uploaded`` to the library); control commands
   relayed to the library;
5. **uploading**: the files the script created or changed (and what it announced), the full output log;
6. ``AttemptEnded`` (succeeded | failed | paused | stopped | cancelled), then **finished** once every
   message is in JetStream.

Everything bound for JetStream goes through the on-disk journal first (``journal.py``), so NATS may be
gone for hours without a line lost or duplicated. Heartbeats are not journaled: a stale one means nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import platform
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import nats.errors

from choline_core import agent_protocol as proto
from choline_core import faults
from choline_core.bus import Bus
from choline_core.errors import BusError, CholineError, InfraError, UserError
from choline_core.events import (
    ArtifactsUploaded,
    AttemptEnded,
    AttemptStarted,
    CheckpointFile,
    CheckpointUploaded,
    ControlApplied,
    ControlCommand,
    Envelope,
    Event,
    Heartbeat,
    LogBatch,
    LogLine,
    MetricBatch,
    MetricPoint,
)
from choline_core.pipeline import (
    PRESIGN_METHOD,
    RESUME_METHOD,
    AgentConfig,
    EnvironmentReady,
    EnvSpec,
    PresignReply,
    PresignRequest,
    ResumeReply,
    ResumeRequest,
)
from choline_core.rpc import raise_for_error
from choline_core.subjects import Subjects

from . import AGENT_VERSION, artifacts, datasets, envs, sysinfo
from .journal import COUNTERS, Counters, Journal
from .library import LibraryServer, socket_path
from .transfer import TransferError, UnsafeArchive, get_file, put_file, safe_extract

log = logging.getLogger("choline_agent")

T = TypeVar("T")

STATUS_FILE = "status.json"
OUTPUT_LOG = "output.log"
INSTALL_LOG = "install.log"
LINE_MAX = 8192
BATCH_LINES = 500
BATCH_BYTES = 256 * 1024
BATCH_POINTS = 500
FLUSH_S = 0.2
PUBLISH_WINDOW = 64
STOP_GRACE_S = float(os.environ.get("CHOLINE_AGENT_STOP_GRACE_S", "30"))
FINAL_UPLOAD_S = 30 * 60.0  # artifacts and the log: give up after this long (checkpoints never give up)


class SetupFailed(Exception):
    """The attempt cannot start the script: bad bundle, failed install, missing checkpoint files ..."""

    def __init__(self, message: str, tail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.tail = tail


@dataclass
class Outcome:
    reason: str  # succeeded | failed | paused | stopped | cancelled | lost
    exit_code: int | None = None
    tail: str | None = None


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def _alive_session(pid: int) -> bool:
    """Whether ``pid`` runs and leads its own session (how the agent starts scripts)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[3]) == pid and fields[0] != "Z"  # session id, state
    except (OSError, IndexError, ValueError):
        return False


def traceback_tail(lines: list[str], max_lines: int = 60, max_chars: int = 4000) -> str:
    """From the last ``Traceback`` on (or the last lines), capped."""
    start = None
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("Traceback (most recent call last)"):
            start = i
            break
    chosen = lines[start:] if start is not None else lines[-30:]
    return "\n".join(chosen[-max_lines:])[-max_chars:]


def uses_trainer(script: Path) -> bool:
    try:
        text = script.read_text(errors="replace")
    except OSError:
        return False
    return "choline" in text and "Trainer" in text


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.cfg = config
        self.wd = Path(config.workdir).resolve()
        self.wd.mkdir(parents=True, exist_ok=True)
        self.code_dir = self.wd / "code"
        self.run_dir = self.wd / "run"
        self.data_dir = self.wd / "data"
        self.cache_dir = self.wd / "cache"
        self.subjects = Subjects(config.subject_prefix)
        self.journal = Journal(self.wd / "journal", config.journal_limit_mb << 20)
        self.counters = Counters(self.wd / "journal" / COUNTERS)
        self.bus: Bus | None = None
        self.bus_ready = asyncio.Event()
        self.phase = "fetching"
        self.step: int | None = None
        self._hb_seq = 0
        self._hb_wake = asyncio.Event()
        self._output = open(self.wd / OUTPUT_LOG, "a", encoding="utf-8")  # noqa: SIM115 - closed in run()
        self._lines: list[LogLine] = []
        self._line_bytes = 0
        self._points: list[MetricPoint] = []
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=300)
        self._stdout_tail: collections.deque[str] = collections.deque(maxlen=60)
        self.proc: asyncio.subprocess.Process | None = None
        self.stop_action: str | None = None
        self.library_paused = False  # the library said its pause checkpoint is written (status "paused")
        self._controls_seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._ck_queue: asyncio.Queue[proto.CheckpointReady] = asyncio.Queue()
        self.control_log: list[dict[str, Any]] = []  # control commands earlier attempts applied
        self.ck_done: set[int] = set()
        self._ck_pending: set[int] = set()
        self.announced: list[tuple[Path, str | None]] = []
        self.library = LibraryServer(socket_path(self.wd), self.on_library_message)
        self._cpu = sysinfo.CpuSampler()
        self._tasks: list[asyncio.Task[Any]] = []
        self._status: dict[str, Any] = {}
        self._closing = False
        self.published = 0

    # ================================================================================ entry point
    async def run(self) -> int:
        """Run the attempt to its end; 0 once ``AttemptEnded`` is in JetStream, 143 when terminated."""
        main = asyncio.current_task()
        loop = asyncio.get_running_loop()
        terminated = False

        def on_signal() -> None:
            nonlocal terminated
            terminated = True
            if main is not None:
                main.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, on_signal)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGUSR2, _dump_tasks)  # `kill -USR2 <pid>`: every task's stack
        prior = self._read_status()
        log.info(
            "choline-agent %s (Python %s) for run %s, attempt %d, box %s",
            AGENT_VERSION,
            platform.python_version(),
            self.cfg.run_id,
            self.cfg.attempt,
            self.cfg.box_id,
        )
        self._tasks = [
            asyncio.create_task(self._connect_loop(), name="connect"),
            asyncio.create_task(self._outbox_loop(), name="outbox"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._flush_loop(), name="flush"),
            asyncio.create_task(self._checkpoint_loop(), name="checkpoints"),
        ]
        try:
            if prior.get("ended"):
                log.info("this attempt already ended (%s); delivering what is left", prior.get("reason"))
                self._status.update(prior)
                self.set_phase("finished")
            elif isinstance(prior.get("outcome"), dict):
                # an earlier agent saw the script end and died before reporting it: report, never rerun
                outcome = Outcome(**prior["outcome"])
                log.info("the script already ended (%s); finishing the attempt", outcome.reason)
                self._status.update(prior)
                self.announced = [(Path(p), n) for p, n in prior.get("announced", [])]
                self.step = prior.get("step")
                await self.finish(outcome)
            elif prior.get("script_pid"):
                # An earlier agent died while the script ran. Running the script again inside the same
                # attempt would log its steps twice; instead the attempt ends as lost (what the earlier
                # agent journaled is delivered first) and the control plane starts a new attempt, which
                # resumes from the newest checkpoint, as after any loss.
                self._kill_orphan(prior)
                self._status.update(prior)
                self.step = prior.get("step")
                tail = "the agent died while the script ran; a new attempt resumes from the last checkpoint"
                self.say(tail)
                await self.finish(Outcome("lost", None, tail), upload_outputs=False)
            else:
                self._kill_orphan(prior)
                self.write_status(ended=False)
                outcome = await self.attempt()
                self._status["outcome"] = dataclasses.asdict(outcome)
                self._status["announced"] = [[str(p), n] for p, n in self.announced]
                self.write_status()
                await self.finish(outcome)
            await self._drain()
            return 0
        except asyncio.CancelledError:
            if not terminated:
                raise
            log.warning("terminated: stopping the script; undelivered messages stay in the journal")
            await self._kill_script(grace=5.0)
            self._flush_batches()
            return 143
        finally:
            self._closing = True
            for task in self._tasks:
                task.cancel()
            # asyncio.wait, not awaiting each task: 3.10/3.11's wait_for can swallow a cancellation
            await asyncio.wait(self._tasks, timeout=5.0)
            await self.library.close()
            if self.bus is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.bus.close(), 5)
            self.journal.close()
            self._output.close()

    # ================================================================================ the attempt
    async def attempt(self) -> Outcome:
        try:
            self._check_version()
            await self.fetch_code()
            interpreter = await self.prepare_env()
            await self.prepare_data()
            resume_from = await self.restore()
        except SetupFailed as exc:
            self.say(f"setup failed: {exc.message}")
            tail = f"{exc.message}\n{exc.tail}".strip() if exc.tail else exc.message
            return Outcome("failed", None, tail)
        except UserError as exc:
            self.say(f"setup failed: {exc.one_line()}")
            return Outcome("failed", None, exc.one_line())
        if self.stop_action:
            return Outcome(self._stop_reason(), None, None)
        # One history: this attempt owns the steps after the one it resumed from (0: from scratch),
        # so the control plane marks earlier attempts' later points superseded.
        resumed = int(self._status.get("resumed_from_step") or 0) if resume_from is not None else 0
        self.emit(
            self.subjects.run_events(self.cfg.run_id),
            AttemptStarted(
                run_id=self.cfg.run_id,
                attempt=self.cfg.attempt,
                box_id=self.cfg.box_id,
                resumed_from_step=resumed,
                checkpoint=str(resume_from) if resume_from else None,
            ),
        )
        return await self.run_script(interpreter, resume_from)

    def _check_version(self) -> None:
        need = self.cfg.agent_min_version
        if need and _version_tuple(AGENT_VERSION) < _version_tuple(need):
            raise SetupFailed(f"this agent is {AGENT_VERSION}; the control plane needs {need} or newer")

    # -------------------------------------------------------------------------------- code
    async def fetch_code(self) -> None:
        self.set_phase("fetching")
        marker = self.wd / ".code-ready"
        baseline = self.wd / "baseline.json"
        digest = self.cfg.code_digest
        if digest and not (marker.exists() and marker.read_text().strip() == digest):
            self.say(f"fetching code {digest[:12]}")
            bundle = self.cache_dir / f"code-{digest}.tar.gz"
            request = PresignRequest(attempt=self.cfg.attempt, purpose="code", method="GET", digest=digest)
            await self.with_urls(
                request, lambda reply: get_file(next(iter(reply.urls.values())), bundle, sha256=digest), attempts=8
            )
            staging = self.wd / ".code-staging"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                count = await asyncio.to_thread(safe_extract, bundle, staging)
            except UnsafeArchive as exc:
                shutil.rmtree(staging, ignore_errors=True)
                raise SetupFailed(f"refused the code bundle: {exc}") from None
            shutil.rmtree(self.code_dir, ignore_errors=True)
            os.replace(staging, self.code_dir)
            marker.write_text(digest)
            baseline.unlink(missing_ok=True)
            self.say(f"code unpacked: {count} files")
        self.code_dir.mkdir(parents=True, exist_ok=True)
        if artifacts.load_snapshot(baseline) is None:
            artifacts.save_snapshot(await asyncio.to_thread(artifacts.snapshot, self.code_dir), baseline)
        script = (self.code_dir / self.cfg.script).resolve()
        if not script.is_relative_to(self.code_dir) or not script.is_file():
            raise SetupFailed(f"the script {self.cfg.script} is not in the code bundle")

    # -------------------------------------------------------------------------------- environment
    async def prepare_env(self) -> envs.Interpreter:
        base = self.cfg.python or sys.executable
        digest = self.cfg.env_digest
        if not digest:
            try:
                interp = await asyncio.to_thread(envs.describe, base, None, True, 0.0)
            except (envs.EnvError, OSError) as exc:
                raise SetupFailed(f"the interpreter {base} does not run: {exc}") from None
        else:
            self.set_phase("installing")
            spec_path = self.cache_dir / f"env-{digest}.json"
            request = PresignRequest(attempt=self.cfg.attempt, purpose="env", method="GET", digest=digest)
            await self.with_urls(
                request, lambda reply: get_file(next(iter(reply.urls.values())), spec_path, sha256=digest), attempts=8
            )
            try:
                spec = EnvSpec.model_validate(json.loads(spec_path.read_text()), context={"lenient": True})
            except ValueError as exc:
                raise SetupFailed(f"the environment spec {digest[:12]} is not readable: {exc}") from None
            envs_dir = Path(self.cfg.envs_dir) if self.cfg.envs_dir else _default_envs_dir()
            self.say(f"environment {digest[:12]}: {len(spec.requirements)} requirements ({spec.source})")
            try:
                interp = await asyncio.to_thread(
                    envs.build, spec, digest, envs_dir, base, self.wd / INSTALL_LOG, dict(os.environ)
                )
            except envs.EnvError as exc:
                raise SetupFailed(exc.message, exc.log_tail) from None
            if spec.python and not f"{interp.version}.".startswith(spec.python.rstrip(".") + "."):
                self.say(f"note: the run asked for Python {spec.python}; this box runs {interp.version}")
        torch = f"torch {interp.torch} (from the {interp.torch_source})" if interp.torch else "no torch"
        reuse = f"reused, {interp.seconds:.1f}s" if interp.reused else f"built in {interp.seconds:.1f}s"
        self.say(f"environment: Python {interp.version}, {torch}; {reuse}")
        self.emit(
            self.subjects.run_events(self.cfg.run_id),
            EnvironmentReady(
                run_id=self.cfg.run_id,
                attempt=self.cfg.attempt,
                box_id=self.cfg.box_id,
                env_digest=digest,
                python=interp.version,
                torch=interp.torch,
                torch_source=interp.torch_source,
                reused=interp.reused,
                seconds=round(interp.seconds, 3),
            ),
        )
        self._status["torch"] = interp.torch
        return interp

    # -------------------------------------------------------------------------------- data
    async def prepare_data(self) -> None:
        """A mount with a manifest is fetched from object storage (``datasets.mount_all``); one with only a
        ``local_path`` on this machine is linked as it is."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for mount in self.cfg.data:
            name = proto.dataset_dirname(mount.name)
            target = self.data_dir / name
            if not mount.manifest and mount.local_path and Path(mount.local_path).exists():
                if not target.exists() and not target.is_symlink():
                    target.symlink_to(Path(mount.local_path).resolve())
                self.say(f"dataset {mount.name}: {mount.local_path}")
        if any(m.manifest for m in self.cfg.data):
            try:
                await datasets.mount_all(self)
            except (CholineError, TransferError, OSError, RuntimeError) as exc:
                text = exc.one_line() if isinstance(exc, CholineError) else str(exc)
                raise SetupFailed(f"fetching the data failed: {text}") from None

    # -------------------------------------------------------------------------------- resume
    async def restore(self) -> Path | None:
        if not self.cfg.resume:
            return None
        delay = 1.0
        for round_ in range(6):
            reply = await self.call(RESUME_METHOD, ResumeRequest(attempt=self.cfg.attempt), ResumeReply)
            self.control_log = list(reply.controls)
            if reply.step is None:
                self.say("no checkpoint of this run yet: starting from the beginning")
                return None
            dest = self.wd / "resume" / str(reply.step)
            try:
                with contextlib.suppress(proto.IncompleteCheckpoint):
                    await asyncio.to_thread(proto.verify_checkpoint, dest)
                    self.say(f"checkpoint of step {reply.step} already here")
                    return dest
                for f in reply.files:
                    target = (dest / f.path).resolve()
                    if not target.is_relative_to(dest.resolve()):
                        raise SetupFailed(f"the checkpoint lists a file outside its folder: {f.path!r}")
                    await asyncio.to_thread(get_file, f.url, target, sha256=f.sha256, size=f.size)
                await asyncio.to_thread(proto.verify_checkpoint, dest)
            except TransferError as exc:
                log.warning("restoring step %s (round %d): %s", reply.step, round_ + 1, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            except proto.IncompleteCheckpoint as exc:
                raise SetupFailed(f"the restored checkpoint is not complete: {exc}") from None
            self.say(f"restored the checkpoint of step {reply.step} (attempt {reply.attempt}) from object storage")
            self._status["resumed_from_step"] = reply.step
            return dest
        raise SetupFailed("could not download the checkpoint to resume from (object storage unreachable?)")

    # -------------------------------------------------------------------------------- the script
    def command(self, python: str, script: Path) -> list[str]:
        n = self.cfg.gpus
        if n > 1 and (self.cfg.distributed or uses_trainer(script)):
            return [
                python,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={n}",
                str(script),
                *self.cfg.args,
            ]
        return [python, "-u", str(script), *self.cfg.args]

    def script_env(self, interp: envs.Interpreter, resume_from: Path | None) -> dict[str, str]:
        env = dict(os.environ)
        for var in proto.ENV_VARS:
            env.pop(var, None)
        env.update(self.cfg.env)
        env.update(
            {
                proto.ENV_RUN_ID: self.cfg.run_id,
                proto.ENV_ATTEMPT: str(self.cfg.attempt),
                proto.ENV_AGENT_SOCKET: str(self.library.path),
                proto.ENV_RUN_DIR: str(self.run_dir),
                proto.ENV_DATA_DIR: str(self.data_dir),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if resume_from is not None:
            env[proto.ENV_RESUME_FROM] = str(resume_from)
        if self.control_log:  # commands earlier attempts applied: the library replays what its checkpoint lacks
            path = self.wd / "controls.jsonl"
            path.write_text("".join(json.dumps(c) + "\n" for c in self.control_log))
            env[proto.ENV_CONTROL_LOG] = str(path)
        if interp.venv is not None:
            env["VIRTUAL_ENV"] = str(interp.venv)
            env["PATH"] = f"{interp.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return env

    async def run_script(self, interp: envs.Interpreter, resume_from: Path | None) -> Outcome:
        self.set_phase("training")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        script = self.code_dir / self.cfg.script
        cmd = self.command(interp.python, script)
        await self.library.start()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *cmd,
                cwd=str(self.code_dir),
                env=self.script_env(interp, resume_from),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            self.say(f"cannot start the script: {exc}")
            return Outcome("failed", None, f"cannot start {cmd[0]}: {exc}")
        self._status["script_pid"] = self.proc.pid
        self.write_status(ended=False)
        shown = " ".join([Path(cmd[0]).name, *(self.cfg.script if a == str(script) else a for a in cmd[1:])][:12])
        self.say(f"started {shown} (pid {self.proc.pid})")
        assert self.proc.stdout is not None and self.proc.stderr is not None
        readers = [
            asyncio.create_task(self._pump(self.proc.stdout, "stdout")),
            asyncio.create_task(self._pump(self.proc.stderr, "stderr")),
        ]
        rc = await self.proc.wait()
        _done, pending = await asyncio.wait(readers, timeout=5.0)
        for task in pending:  # a child the script left behind holds the pipes open
            task.cancel()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # nothing of the script outlives it
        self._flush_batches()
        code = rc if rc >= 0 else 128 - rc
        if self.stop_action:
            self.say(f"the script stopped (exit code {code}) after a {self.stop_action} command")
            return Outcome(self._stop_reason(), code, None)
        if rc == 0:
            self.say("the script finished (exit code 0)")
            return Outcome("succeeded", 0, None)
        if rc == proto.EXIT_PAUSED or (self.library_paused and rc > 0):  # torchrun exits 1 when its ranks exit 75
            self.say("the script paused")
            return Outcome("paused", rc, None)
        lines = list(self._stderr_tail) or list(self._stdout_tail)
        self.say(f"the script failed (exit code {code})")
        return Outcome("failed", code, traceback_tail(lines))

    def _stop_reason(self) -> str:
        return "cancelled" if self.stop_action == "cancel" else "stopped"

    async def _pump(self, stream: asyncio.StreamReader, name: str) -> None:
        buf = b""
        while True:
            chunk = await stream.read(65536)
            if not chunk:
                break
            buf += chunk
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    if len(buf) > LINE_MAX:
                        cut = buf.rfind(b"\r")
                        if cut > 0:
                            buf = buf[cut + 1 :]  # a progress bar redrawing itself: keep what a terminal shows
                        if len(buf) > LINE_MAX:
                            self._script_line(name, buf[:LINE_MAX])
                            buf = buf[LINE_MAX:]
                    break
                self._script_line(name, buf[:nl])
                buf = buf[nl + 1 :]
        if buf:
            self._script_line(name, buf)

    def _script_line(self, stream: str, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip("\r")
        if "\r" in text:
            text = next((p for p in reversed(text.split("\r")) if p.strip()), "")
        (self._stderr_tail if stream == "stderr" else self._stdout_tail).append(text)
        self.line(stream, text)

    async def _kill_script(self, grace: float) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    def _kill_orphan(self, prior: dict[str, Any]) -> None:
        pid = prior.get("script_pid")
        if isinstance(pid, int) and pid != os.getpid() and _alive_session(pid):
            log.warning("a script of an earlier agent (pid %d) is still running: stopping it", pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)

    # ================================================================================ the library
    async def on_library_message(self, msg: proto.Message) -> None:
        if isinstance(msg, proto.Metrics):
            for p in msg.points:
                self._points.append(
                    MetricPoint(
                        seq=self.counters.take("metric"),
                        step=p.step,
                        key=p.key,
                        value=p.value,
                        raw=p.raw,
                        ts=datetime.fromtimestamp(p.ts, timezone.utc),
                        epoch=p.epoch,
                    )
                )
                self.step = p.step if self.step is None else max(self.step, p.step)
            if len(self._points) >= BATCH_POINTS:
                self._flush_points()
        elif isinstance(msg, proto.CheckpointReady):
            if msg.step in self.ck_done:
                await self.library.send(proto.Uploaded(step=msg.step))
            elif msg.step not in self._ck_pending:
                self._ck_pending.add(msg.step)
                self._ck_queue.put_nowait(msg)
        elif isinstance(msg, proto.Status):
            self.step = msg.step
            if msg.phase == "paused":
                self.library_paused = True
        elif isinstance(msg, proto.Artifact):
            self.announced.append((Path(msg.path), msg.name))
        elif isinstance(msg, proto.Hello):
            self.say(
                f"training library {msg.library_version} connected (pid {msg.pid}, rank {msg.rank} of {msg.world_size})"
            )
        elif isinstance(msg, proto.ControlAck):
            verdict = "applied" if msg.ok else "refused"
            self.say(f"control {msg.id[:8]} {verdict} at step {msg.step}" + (f": {msg.message}" if msg.message else ""))
            if not msg.replay:  # a replayed command is already on record
                ack = msg.model_dump(mode="json", exclude={"type"})
                self.emit(
                    self.subjects.run_events(self.cfg.run_id),
                    ControlApplied(run_id=self.cfg.run_id, attempt=self.cfg.attempt, ack=ack),
                )

    async def on_control(self, env: Envelope) -> None:
        if env.id in self._controls_seen:
            return
        self._controls_seen[env.id] = None
        while len(self._controls_seen) > 1000:
            self._controls_seen.popitem(last=False)
        try:
            cmd = env.event(ControlCommand)
        except ValueError as exc:
            log.warning("ignoring an unreadable control command: %s", exc)
            return
        if cmd.run_id != self.cfg.run_id:
            return
        action = cmd.action.value
        self.say(f"control: {action}" + (f" {json.dumps(cmd.params, sort_keys=True)}" if cmd.params else ""))
        await self.library.send(proto.Control(id=env.id, action=action, params=cmd.params))
        if action in ("stop", "cancel"):
            self.stop_action = action
            if self.proc is not None and self.proc.returncode is None:
                grace = STOP_GRACE_S if self.library.ever_connected else 0.0
                self._tasks.append(asyncio.create_task(self._stop_after(grace)))

    async def _stop_after(self, grace: float) -> None:
        """A script that does not stop by itself within ``grace`` gets SIGTERM, then SIGKILL."""
        proc = self.proc
        if proc is None:
            return
        if grace > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), grace)
        if proc.returncode is None:
            await self._kill_script(grace=10.0)

    # ================================================================================ checkpoints
    async def _checkpoint_loop(self) -> None:
        while not self._closing:
            msg = await self._ck_queue.get()
            # Behind (checkpoints come faster than they upload)? Upload the newest only: an older
            # one is superseded by it, and a stale upload would delay the one a recovery needs.
            taken = [msg]
            while not self._ck_queue.empty():
                taken.append(self._ck_queue.get_nowait())
            newest = max(taken, key=lambda m: m.step)
            skipped = [m.step for m in taken if m is not newest]
            if skipped:
                log.info("checkpoints of steps %s superseded by step %d before their upload", skipped, newest.step)
            try:
                await self.upload_checkpoint(newest)
            except Exception:
                log.exception("uploading the checkpoint of step %d failed", newest.step)
            finally:
                for m in taken:
                    self._ck_pending.discard(m.step)
                    self._ck_queue.task_done()

    async def upload_checkpoint(self, msg: proto.CheckpointReady) -> None:
        folder = Path(msg.dir)
        try:
            manifest = proto.read_manifest(folder)
        except proto.IncompleteCheckpoint as exc:
            log.warning("checkpoint of step %d skipped: %s", msg.step, exc)
            return
        await faults.abarrier("agent.before_checkpoint_upload")
        names = [f.path for f in manifest.files]
        request = PresignRequest(
            attempt=self.cfg.attempt, purpose="checkpoint", method="PUT", step=msg.step, files=[*names, proto.MANIFEST]
        )
        t0 = time.monotonic()
        delay = 0.5
        while True:
            reply = await self.presign(request)
            try:
                for i, name in enumerate(names):
                    await asyncio.to_thread(put_file, reply.urls[name], folder / name)
                    if i == 0:
                        await faults.abarrier("agent.checkpoint_upload.midway")
                if not names:
                    await faults.abarrier("agent.checkpoint_upload.midway")
                await asyncio.to_thread(put_file, reply.urls[proto.MANIFEST], folder / proto.MANIFEST)
                break
            except FileNotFoundError:
                log.warning("checkpoint of step %d vanished before its upload (the library's disk bound)", msg.step)
                return
            except TransferError as exc:
                log.warning("checkpoint of step %d: %s; retrying in %.1fs", msg.step, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        size = sum(f.size for f in manifest.files)
        metrics = {k: float(v) for k, v in (msg.metrics or manifest.metrics).items() if v is not None}
        self.emit(
            self.subjects.run_events(self.cfg.run_id),
            CheckpointUploaded(
                run_id=self.cfg.run_id,
                attempt=self.cfg.attempt,
                step=msg.step,
                prefix=reply.prefix,
                files=[CheckpointFile(path=f.path, size=f.size, sha256=f.sha256) for f in manifest.files],
                metrics=metrics,
                reason=msg.reason,
            ),
        )
        self.ck_done.add(msg.step)
        await self.library.send(proto.Uploaded(step=msg.step))
        log.info("checkpoint of step %d uploaded (%d bytes, %.2fs)", msg.step, size, time.monotonic() - t0)

    # ================================================================================ the end
    async def finish(self, outcome: Outcome, *, upload_outputs: bool = True) -> None:
        """Checkpoints, artifacts, the log, then ``AttemptEnded``: whatever fails on the way, the attempt ends.

        ``upload_outputs=False`` (a lost attempt): no artifacts or log; the attempt that replaces it
        brings back the run's outputs."""
        self.set_phase("uploading")
        await self.library.wait_closed(5.0)  # the library's last words (a pause checkpoint) are read
        await self._ck_queue.join()  # the last checkpoints first (a pause counts only once uploaded)
        if upload_outputs:
            try:
                await asyncio.wait_for(self.upload_artifacts(), FINAL_UPLOAD_S)
            except asyncio.TimeoutError:
                self.say("artifacts: object storage stayed unreachable; they are left on the box")
            except (CholineError, SetupFailed, OSError) as exc:
                self.say(f"artifacts could not be uploaded: {exc}")
        self._flush_batches()
        if upload_outputs:
            try:
                await asyncio.wait_for(self.upload_log(), FINAL_UPLOAD_S)
            except (asyncio.TimeoutError, CholineError, SetupFailed, OSError) as exc:
                log.warning("the output log was not uploaded: %s", exc)
        await faults.abarrier("agent.before_attempt_end")
        self.emit(
            self.subjects.run_events(self.cfg.run_id),
            AttemptEnded(
                run_id=self.cfg.run_id,
                attempt=self.cfg.attempt,
                box_id=self.cfg.box_id,
                reason=outcome.reason,
                exit_code=outcome.exit_code,
                last_step=self.step,
                traceback_tail=outcome.tail,
            ),
        )
        self._status.update(reason=outcome.reason, exit_code=outcome.exit_code)
        self.write_status(ended=True)
        self.set_phase("finished")
        log.info("attempt %d ended: %s", self.cfg.attempt, outcome.reason)

    async def upload_artifacts(self) -> None:
        before = artifacts.load_snapshot(self.wd / "baseline.json") or {}
        chosen, left = await asyncio.to_thread(
            artifacts.collect,
            self.code_dir,
            before,
            self.announced,
            self.cfg.artifacts_limit_mb << 20,
            self.cache_dir / "bundles",
        )
        if left:
            mb = sum(i.size for i in left) / 2**20
            names = ", ".join(i.name for i in left[:5]) + (" ..." if len(left) > 5 else "")
            self.say(
                f"artifacts: {len(left)} files ({mb:.1f} MB) left on the box, over the "
                f"{self.cfg.artifacts_limit_mb} MB limit: {names}"
            )
        if not chosen:
            return
        files: list[CheckpointFile] = []
        for start in range(0, len(chosen), 500):
            part = chosen[start : start + 500]
            request = PresignRequest(
                attempt=self.cfg.attempt, purpose="artifact", method="PUT", files=[i.name for i in part]
            )
            uploaded: set[str] = set()

            def send(reply: PresignReply, part: list[artifacts.Item] = part, uploaded: set[str] = uploaded) -> str:
                for item in part:
                    if item.name not in uploaded:
                        put_file(reply.urls[item.name], item.path)
                        uploaded.add(item.name)
                return reply.prefix

            prefix = await self.with_urls(request, send)
            for item in part:
                files.append(CheckpointFile(path=item.name, size=item.size, sha256=_sha256(item.path)))
        bundle = next((i for i in chosen if i.bundle), None)
        self.emit(
            self.subjects.run_events(self.cfg.run_id),
            ArtifactsUploaded(
                run_id=self.cfg.run_id,
                attempt=self.cfg.attempt,
                prefix=prefix,
                files=files,
                bundle=f"{prefix}/{bundle.name}" if bundle else None,
            ),
        )
        total = sum(f.size for f in files) / 2**20
        extra = f", bundle {bundle.name}" if bundle else ""
        self.say(f"artifacts: {len(files)} files ({total:.1f} MB) uploaded{extra}")

    async def upload_log(self) -> None:
        self._output.flush()
        path = self.wd / OUTPUT_LOG
        request = PresignRequest(attempt=self.cfg.attempt, purpose="logs", method="PUT")
        await self.with_urls(request, lambda reply: put_file(next(iter(reply.urls.values())), path))

    async def _drain(self) -> None:
        """Wait until every journaled message is in JetStream (however long NATS stays away)."""
        self._flush_batches()
        while self.journal.pending:
            await asyncio.sleep(0.1)
        self._hb_wake.set()
        await asyncio.sleep(0)

    # ================================================================================ NATS
    async def _connect_loop(self) -> None:
        cfg = self.cfg
        while self.bus is None:
            try:
                bus = await Bus.connect(
                    cfg.nats_url,
                    name=f"choline-agent-{cfg.box_id}",
                    subjects=self.subjects,
                    reconnect="forever",
                    creds=cfg.nats_creds,
                    token=cfg.nats_token,
                    inbox_prefix=cfg.inbox_prefix,
                )
            except BusError as exc:
                log.warning("%s; retrying", exc.one_line())
                await asyncio.sleep(2.0)
                continue
            await bus.subscribe_core(self.subjects.run_control(cfg.run_id), self.on_control)
            self.bus = bus
            self.bus_ready.set()
            self._hb_wake.set()
            log.info("connected to NATS at %s", cfg.nats_url)

    async def wait_bus(self) -> Bus:
        await self.bus_ready.wait()
        assert self.bus is not None
        while not self.bus.connected:
            await asyncio.sleep(0.2)
        return self.bus

    async def call(self, method: str, event: Event, reply_type: type[T], timeout: float = 15.0) -> T:
        """A request to the control plane on this run's subject; retried while the control plane is away."""
        subject = self.subjects.run_request(self.cfg.run_id, method)
        env = event.envelope(run_id=self.cfg.run_id, box_id=self.cfg.box_id)
        delay = 0.5
        while True:
            bus = await self.wait_bus()
            try:
                reply = raise_for_error(await bus.request(subject, env, timeout=timeout))
                return reply.event(reply_type)  # type: ignore[type-var, no-any-return]
            except UserError:
                raise
            except (InfraError, nats.errors.Error, asyncio.TimeoutError) as exc:
                log.warning("%s request: %s; retrying in %.1fs", method, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def presign(self, request: PresignRequest) -> PresignReply:
        return await self.call(PRESIGN_METHOD, request, PresignReply)

    async def with_urls(
        self, request: PresignRequest, action: Callable[[PresignReply], T], *, attempts: int | None = None
    ) -> T:
        """Presign, then ``action(reply)`` in a thread; on a transfer failure presign again (fresh URLs)."""
        delay = 0.5
        n = 0
        while True:
            reply = await self.presign(request)
            try:
                return await asyncio.to_thread(action, reply)
            except TransferError as exc:
                n += 1
                if not exc.retryable or (attempts is not None and n >= attempts):
                    raise SetupFailed(f"{request.purpose} transfer failed: {exc}") from None
                log.warning("%s transfer: %s; retrying in %.1fs", request.purpose, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    def emit(self, subject: str, event: Event) -> None:
        """Journal an event for JetStream (the outbox publishes it, in order, once NATS is there)."""
        self.journal.append(subject, event.envelope(run_id=self.cfg.run_id, box_id=self.cfg.box_id))

    async def _outbox_loop(self) -> None:
        delay = 0.2
        while not self._closing:
            bus = await self.wait_bus()
            records = self.journal.peek(PUBLISH_WINDOW)
            if not records:
                await self.journal.wait_new(0.5)
                continue
            results = await asyncio.gather(
                *(bus.publish(r.subject, r.envelope, timeout=5.0, retries=0) for r in records),
                return_exceptions=True,
            )
            ok = 0
            for res in results:
                if isinstance(res, BaseException):
                    if isinstance(res, nats.errors.MaxPayloadError):
                        log.error("dropping a message larger than the server allows")
                    else:
                        break
                ok += 1
            if ok:
                self.journal.ack(records[ok - 1].end, ok)
                self.published += ok
            if ok < len(records):
                log.info("publishing: %s; %d messages wait", results[ok], len(records) - ok)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            else:
                delay = 0.2

    async def _heartbeat_loop(self) -> None:
        while not self._closing:
            bus = self.bus
            if bus is not None and bus.connected:
                self._hb_seq += 1
                hb = Heartbeat(
                    box_id=self.cfg.box_id,
                    run_id=self.cfg.run_id,
                    attempt=self.cfg.attempt,
                    agent_version=AGENT_VERSION,
                    seq=self._hb_seq,
                    step=self.step,
                    phase=self.phase,
                    cpu_percent=self._cpu.percent(),
                    mem_used_mb=sysinfo.memory_used_mb(),
                    gpus=await sysinfo.gpus(),
                )
                try:
                    await bus.publish(self.subjects.box_heartbeat(self.cfg.box_id), hb, timeout=2.0, retries=0)
                except (CholineError, nats.errors.Error, asyncio.TimeoutError) as exc:
                    log.debug("heartbeat: %s", exc)
            self.write_status()
            self._hb_wake.clear()
            await wait_event(self._hb_wake, self.cfg.heartbeat_s)

    # ================================================================================ logs and metrics
    def line(self, stream: str, text: str) -> None:
        seq = self.counters.take("log")
        self._lines.append(LogLine(seq=seq, stream=stream, text=text))
        self._line_bytes += len(text)
        self._output.write(("[choline] " + text if stream == "agent" else text) + "\n")
        if len(self._lines) >= BATCH_LINES or self._line_bytes >= BATCH_BYTES:
            self._flush_lines()

    def say(self, text: str) -> None:
        """A line of the agent's own in the run's log (stream ``agent``)."""
        log.info("%s", text)
        self.line("agent", text)

    def _flush_lines(self) -> None:
        if self._lines:
            lines, self._lines, self._line_bytes = self._lines, [], 0
            self.emit(
                self.subjects.run_logs(self.cfg.run_id),
                LogBatch(run_id=self.cfg.run_id, attempt=self.cfg.attempt, lines=lines),
            )

    def _flush_points(self) -> None:
        if self._points:
            points, self._points = self._points, []
            self.emit(
                self.subjects.run_metrics(self.cfg.run_id),
                MetricBatch(run_id=self.cfg.run_id, attempt=self.cfg.attempt, points=points),
            )

    def _flush_batches(self) -> None:
        self._flush_lines()
        self._flush_points()
        self._output.flush()

    async def _flush_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(FLUSH_S)
            self._flush_batches()

    # ================================================================================ status
    def set_phase(self, phase: str) -> None:
        if phase != self.phase:
            self.phase = phase
            self._hb_wake.set()
            self.write_status()

    def _read_status(self) -> dict[str, Any]:
        try:
            data = json.loads((self.wd / STATUS_FILE).read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def write_status(self, ended: bool | None = None) -> None:
        """``<workdir>/status.json``: what the provisioner reads over SSH to probe the agent."""
        if ended is not None:
            self._status["ended"] = ended
        self._status.update(
            agent_pid=os.getpid(),
            agent_version=AGENT_VERSION,
            run_id=self.cfg.run_id,
            attempt=self.cfg.attempt,
            phase=self.phase,
            step=self.step,
            nats_connected=bool(self.bus and self.bus.connected),
            journal_pending=self.journal.pending,
            journal_dropped=self.journal.dropped,
            updated=time.time(),
        )
        with contextlib.suppress(OSError):
            _write_json(self.wd / STATUS_FILE, self._status)


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for ``event`` up to ``timeout``; True if it is set. (Never swallows a cancellation, unlike
    ``asyncio.wait_for`` on Python 3.10/3.11 when the event fires as the task is cancelled.)"""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return bool(done)


def _dump_tasks() -> None:
    for task in asyncio.all_tasks():
        sys.stderr.write(f"--- {task.get_name()}: {task!r}\n")
        task.print_stack(file=sys.stderr)
    sys.stderr.flush()


def _sha256(path: Path) -> str:
    return proto.sha256_file(path)


def _default_envs_dir() -> Path:
    home = os.environ.get("CHOLINE_HOME") or str(Path.home() / ".choline")
    return Path(home).expanduser() / "envs"


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """The provisioner's ``agent.json``, read leniently (a newer provisioner may write fields this agent
    does not know)."""
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"cannot read the agent config {path}: {exc}") from None
    except ValueError as exc:
        raise UserError(f"the agent config {path} is not JSON: {exc}") from None
    try:
        return AgentConfig.model_validate(raw, context={"lenient": True})
    except ValueError as exc:
        raise UserError(f"the agent config {path} is not valid: {exc}") from None
