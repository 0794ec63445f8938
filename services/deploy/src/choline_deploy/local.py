"""Serving processes on this machine: ``python -m choline.serve`` each in a session of its own.

A replica's folder is ``$CHOLINE_HOME/deploy/replicas/<replica id>/``: ``serve.log`` (its output),
``ready.json`` (written by the serving process once it answers: url, port, pid) and ``bundle/`` (the tarball
unpacked there once; a restart loads it from there). Tarballs are fetched once per content into
``deploy/bundles/<sha256>.choline-bundle.tar.gz`` and checked against the sha256 the syncer recorded.

The serving process gets none of the control plane's ``CHOLINE_*`` settings (no S3 keys, no NATS
credentials): it needs only the bundle. Processes run in their own session, so they outlive a restart of the
deploy service, which adopts them again from ``deploy_replica`` (pid and URL).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from choline_core.deploy import DeployConfig
from choline_core.errors import BadSpec
from choline_core.storage import S3Store

log = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not reaped) is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class LocalRunner:
    def __init__(self, root: Path, objects: S3Store, python: str | None = None) -> None:
        self.root = root
        self.objects = objects
        self.python = python or sys.executable
        self.procs: dict[str, subprocess.Popen[bytes]] = {}  # replica id -> the process this service started
        self._fetching = threading.Lock()  # replicas of one version start together: one download each

    def folder(self, replica_id: str) -> Path:
        return self.root / "replicas" / replica_id

    def fetch(self, key: str, sha256: str) -> Path:
        """The bundle tarball on local disk, checked against its sha256 (downloaded once per content)."""
        dest = self.root / "bundles" / f"{sha256}.choline-bundle.tar.gz"
        with self._fetching:
            if dest.exists() and _sha256(dest) == sha256:
                return dest
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f"tmp-{uuid.uuid4().hex}-{dest.name}")
            try:
                self.objects.get_file(key, tmp)
                if _sha256(tmp) != sha256:
                    raise BadSpec(f"the bundle {key} does not match its recorded sha256 (damaged in storage?)")
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
            return dest

    def start(self, replica_id: str, tarball: Path, *, name: str, version: int, config: DeployConfig) -> int:
        """Start a serving process; returns its pid. ``ready_url`` tells when (and where) it answers."""
        folder = self.folder(replica_id)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ready.json").unlink(missing_ok=True)
        cmd = [
            self.python, "-m", "choline.serve", str(tarball),
            "--host", "127.0.0.1", "--port", "0",
            "--ready-file", str(folder / "ready.json"),
            "--extract-to", str(folder / "bundle"),
            "--max-batch", str(config.max_batch),
            "--max-wait-ms", str(config.max_wait_ms),
            "--timeout-s", str(config.timeout_s),
            "--name", name, "--version", str(version),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHOLINE_")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(folder / "serve.log", "ab") as logf:
            proc = subprocess.Popen(
                cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        self.procs[replica_id] = proc
        log.info("replica %s of %s:%d started (pid %d)", replica_id, name, version, proc.pid)
        return proc.pid

    def ready_url(self, replica_id: str) -> str | None:
        try:
            info: dict[str, Any] = json.loads((self.folder(replica_id) / "ready.json").read_text())
            return str(info["url"])
        except (OSError, ValueError, KeyError):
            return None

    def exited(self, replica_id: str, pid: int | None) -> int | None:
        """The exit code if the process is gone (-1 when it is not our child), else None."""
        proc = self.procs.get(replica_id)
        if proc is not None and proc.pid == pid:
            return proc.poll()
        return None if pid_alive(pid) else -1

    def log_tail(self, replica_id: str, lines: int = 5) -> str:
        try:
            text = (self.folder(replica_id) / "serve.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())

    def stop(self, replica_id: str, pid: int | None, *, grace: float = 35.0, forget: bool = True) -> None:
        """SIGTERM (the process drains what it received), then SIGKILL after ``grace`` seconds. Blocking."""
        proc = self.procs.pop(replica_id, None) if forget else self.procs.get(replica_id)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if proc is not None and proc.pid == pid:
                    if proc.poll() is not None:
                        break
                elif not pid_alive(pid):
                    break
                time.sleep(0.05)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                if proc is not None:
                    proc.wait()
        if forget:
            shutil.rmtree(self.folder(replica_id), ignore_errors=True)

    def kill(self, replica_id: str, pid: int | None) -> None:
        """Gone at once (a replica that stopped answering)."""
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        proc = self.procs.get(replica_id)
        if proc is not None:
            proc.wait()
