"""Serving on a rented box (``--gpus SPEC --provider P``): a replica is a run whose script is the serving
process, so the provisioner rents, bootstraps, watches and replaces the box, and the agent runs and streams
it, exactly as for training.

- The code bundle (``code/<sha256>.tar.gz``, content-addressed like ``choline run``'s) holds ``serve_box.py``
  (below), the model's bundle tarball and ``serve.token``; the env spec asks for torch, numpy, safetensors and
  uvicorn (a box's base interpreter that has them is reused; the agent installs choline itself).
- ``RunRequested`` (owner: the deployment's) goes to the provisioner on ``<p>.provision.requests``, like the
  gateway's. The serving process prints its ready line (``{"event": "ready", "url": ...}``); the agent
  streams it with the run's logs, where this service reads it (the LOGS stream, the run's subject only).
- A lost box: the provisioner recovers the run on another box (a new attempt); the serving process starts
  there and prints a new ready line, which replaces the replica's URL. A run that ends (failed, cancelled)
  is replaced by a new run. Undeploy cancels the run; the provisioner destroys the box.
- The box's serving process requires ``Authorization: Bearer <token>`` for predictions: the token is an HMAC
  of this deployment version under the deploy service's key (``$CHOLINE_HOME/secrets/deploy-serve.key``,
  or ``CHOLINE_DEPLOY_KEY``), never stored in a database; the gateway gets it with the route.

Limits (docs/deploy.md): the URL is the one the serving process binds (``CHOLINE_DEPLOY_BOX_BIND``, default
127.0.0.1): right for local and emulated boxes, which run on this machine. A rented machine elsewhere needs its
serving port reachable from the control plane (an SSH forward by the provisioner, or the provider's port
mapping), which the provisioner does not open yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import hmac
import io
import json
import logging
import os
import secrets
import tarfile
from pathlib import Path

from choline_core import deploy as c
from choline_core import pipeline, rpc
from choline_core.bus import Bus
from choline_core.errors import BadSpec
from choline_core.events import ControlAction, ControlCommand, Envelope, RunRequested, RunSpec
from choline_core.storage import S3Store
from choline_core.subjects import Subjects

log = logging.getLogger(__name__)

SCRIPT = "serve_box.py"
BUNDLE = "bundle.choline-bundle.tar.gz"
BOX_SCRIPT = '''"""choline deploy: serve the bundle beside this file on this box (python -m choline.serve)."""

import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "serve.token")) as fh:
    os.environ["CHOLINE_SERVE_TOKEN"] = fh.read().strip()
bundle = os.path.join(here, "bundle.choline-bundle.tar.gz")
os.execv(sys.executable, [sys.executable, "-u", "-m", "choline.serve", bundle, *sys.argv[1:]])
'''
TERMINAL = ("succeeded", "failed", "cancelled")


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(f"{name}")
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


def code_bundle(bundle_tarball: Path, token: str) -> bytes:
    """A deterministic tar.gz: the launcher, the model's bundle, the token (same inputs, same bytes)."""
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tf:  # type: ignore[call-overload]
        _member(tf, SCRIPT, BOX_SCRIPT.encode())
        _member(tf, BUNDLE, bundle_tarball.read_bytes())
        _member(tf, "serve.token", token.encode())
    return raw.getvalue()


class BoxRunner:
    def __init__(self, bus: Bus, subjects: Subjects, objects: S3Store, key: bytes, bind: str = "127.0.0.1") -> None:
        self.bus = bus
        self.subjects = subjects
        self.objects = objects
        self.key = key
        self.bind = bind

    @staticmethod
    def load_key(home: Path, configured: str | None) -> bytes:
        if configured:
            return configured.encode()
        path = home / "secrets" / "deploy-serve.key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(32))
        return path.read_text().strip().encode()

    def token(self, owner: str, name: str, version: int) -> str:
        msg = f"{owner}/{name}/{version}".encode()
        return hmac.new(self.key, msg, hashlib.sha256).hexdigest()

    async def start(
        self, *, owner: str, name: str, model: c.ModelVersionInfo, config: c.DeployConfig, tarball: Path
    ) -> str:
        """Queue the serving run; returns its id."""
        token = self.token(owner, name, model.version)
        code = await asyncio.to_thread(code_bundle, tarball, token)
        digest = hashlib.sha256(code).hexdigest()
        if not await asyncio.to_thread(self.objects.exists, pipeline.code_key(digest)):
            await asyncio.to_thread(self.objects.put_bytes, pipeline.code_key(digest), code)
        env = pipeline.EnvSpec(requirements=["torch", "numpy", "safetensors", "uvicorn"], source="flag")
        if not await asyncio.to_thread(self.objects.exists, pipeline.env_key(env.digest())):
            await asyncio.to_thread(self.objects.put_bytes, pipeline.env_key(env.digest()), env.to_bytes())
        spec = RunSpec(
            name=f"deploy-{name}-{model.version}",
            project="deployments",
            script=SCRIPT,
            args=[
                "--host", self.bind, "--port", "0",
                "--max-batch", str(config.max_batch), "--max-wait-ms", str(config.max_wait_ms),
                "--timeout-s", str(config.timeout_s), "--name", name, "--version", str(model.version),
                "--device", "auto",
            ],
            gpus=config.gpus or "1xcpu",
            provider=config.provider,
            code_digest=digest,
            env_digest=env.digest(),
            max_attempts=100,
        )  # fmt: skip
        run_id = "d" + secrets.token_hex(6)
        event = RunRequested(run_id=run_id, owner=owner, spec=spec)
        await self.bus.publish(self.subjects.provision("requests"), event.envelope(id=f"run-requested-{run_id}"))
        log.info("deployment %s/%s: serving run %s queued (%s on %s)", owner, name, run_id, spec.gpus, spec.provider)
        return run_id

    async def run(self, run_id: str) -> rpc.RunInfo | None:
        try:
            env = await self.bus.request(
                self.subjects.rpc(rpc.PROVISIONER, rpc.GET_RUN), rpc.RunQuery(run_id=run_id), timeout=10
            )
            rpc.raise_for_error(env)
        except Exception as exc:
            log.debug("run %s: %s", run_id, exc)
            return None
        return env.event(rpc.RunInfo)

    async def ended(self, run_id: str) -> str | None:
        """``failed: reason`` (or ``cancelled``...) once the serving run has ended, else None."""
        info = await self.run(run_id)
        if info is None or info.state.value not in TERMINAL:
            return None
        return f"{info.state.value}: {info.reason}" if info.reason else info.state.value

    async def ready_url(self, run_id: str) -> str | None:
        """The URL of the newest ready line the run's serving process printed (the newest attempt's)."""
        subject = self.subjects.run_logs(run_id)
        psub = await self.bus.js.pull_subscribe(subject, durable=None, stream=self.subjects.stream_for(subject))
        best: tuple[int, str] | None = None
        try:
            want = (await psub.consumer_info()).num_pending or 0
            seen = 0
            while seen < want:
                try:
                    msgs = await psub.fetch(min(256, want - seen), timeout=2)
                except Exception:
                    break
                for msg in msgs:
                    seen += 1
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        env = Envelope.parse(msg.data)
                        for line in env.data.get("lines", []):
                            text = str(line.get("text", ""))
                            if '"event": "ready"' in text:
                                info = json.loads(text[text.index("{") :])
                                attempt = int(env.data.get("attempt", 0))
                                if best is None or attempt >= best[0]:
                                    best = (attempt, str(info["url"]))
                    await msg.ack()
        finally:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()
        return best[1] if best else None

    async def stop(self, run_id: str, *, wait_s: float = 90.0) -> None:
        """Cancel the serving run; the provisioner releases its box. Waits until the run has ended."""
        info = await self.run(run_id)
        if info is not None and info.state.value in TERMINAL:
            return
        cmd = ControlCommand(run_id=run_id, action=ControlAction.cancel, by="deploy")
        await self.bus.publish(self.subjects.run_control(run_id), cmd)
        deadline = asyncio.get_running_loop().time() + wait_s
        while asyncio.get_running_loop().time() < deadline:
            info = await self.run(run_id)
            if info is not None and info.state.value in TERMINAL:
                return
            await asyncio.sleep(0.5)
        log.warning("serving run %s has not ended %g s after its cancel", run_id, wait_s)


def check_provider(config: c.DeployConfig) -> None:
    if config.provider not in ("local", "ssh", "vast"):
        raise BadSpec(f"unknown provider {config.provider!r}", hint="local, ssh or vast")
