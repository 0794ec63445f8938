"""``python -m choline.serve`` as its own process: it announces where it listens, drains what it received on
SIGTERM and exits 0, and refuses bad arguments and bad bundles in one line."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def start(bundle: Path, tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], int, Path]:
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "choline.serve", str(bundle), "--port", "0", "--ready-file", str(ready),
         "--extract-to", str(tmp_path / "unpacked"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.time() + 90
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stderr.read() if proc.stderr else ''}")
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    return proc, int(json.loads(ready.read_text())["port"]), ready


@pytest.mark.slow
def test_sigterm_answers_every_request_received_then_exits_0(slow_bundle: Path, tmp_path: Path) -> None:
    proc, port, ready = start(slow_bundle, tmp_path, "--max-batch", "1", "--max-wait-ms", "0")
    try:
        assert proc.stdout is not None
        line = json.loads(proc.stdout.readline())
        assert line["event"] == "ready" and line["port"] == port and line["url"] == f"http://127.0.0.1:{port}"
        base = f"http://127.0.0.1:{port}"

        def predict(i: int) -> tuple[int, int, list[float]]:
            r = httpx.post(f"{base}/predict", json={"x": [i, i, i, i]}, timeout=30)
            return i, r.status_code, r.json()["y"]["value"] if r.status_code == 200 else r.text

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(predict, i) for i in range(6)]
            deadline = time.time() + 30
            while (stats := httpx.get(f"{base}/stats").json())["requests"] < 6:  # all six received
                assert time.time() < deadline
                time.sleep(0.01)
            assert stats["in_flight"] >= 1  # one at a time, 0.2 s each: the last one is still waiting
            proc.send_signal(signal.SIGTERM)
            results = [f.result() for f in futures]
        for i, status, value in results:
            assert status == 200, value
            assert value == [i * 1.0, i * 2.0, i * 3.0, i * 4.0]
        assert proc.wait(30) == 0
        assert not ready.exists()
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", port))
        # a restart finds the unpacked bundle and loads it from there
        proc2, port2, _ = start(slow_bundle, tmp_path)
        try:
            r = httpx.post(f"http://127.0.0.1:{port2}/predict", json={"x": [1, 1, 1, 1]}, timeout=30)
            assert r.json()["y"]["value"] == [1.0, 2.0, 3.0, 4.0]
        finally:
            proc2.terminate()
            assert proc2.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_bad_arguments_and_bad_bundles_are_one_line(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "choline.serve"]
    out = subprocess.run([*cmd, "x.tar.gz", "--max-batch", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.strip() == "error: --max-batch must be at least 1"
    broken = tmp_path / "broken.choline-bundle.tar.gz"
    broken.write_bytes(b"not a tarball")
    out = subprocess.run([*cmd, str(broken), "--port", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "is not a readable tar archive" in out.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([*cmd, str(broken), "--port", str(port)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in out.stderr
