"""The `make run` demo: train the digits example on a local box, kill the box mid-run, and watch
choline recover on a new box and finish as one run; then show where the results are.

    python examples/digits/demo.py [--no-kill]

It drives the real CLI (`choline train.py --1xcpu`) against the control plane `choline up`
started, streaming its output; at about 40 % of the training it SIGKILLs the box's processes,
as a machine dying would. Needs the control plane's packages (it reaches into the local
provider to kill the box).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def say(text: str) -> None:
    sys.stderr.write(f"\n=== demo: {text}\n\n")
    sys.stderr.flush()


def choline(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "choline.cli.main", *args], capture_output=True, text=True, timeout=120
    )


def killer(run_ids: list[str], at_step: int, done: threading.Event) -> None:
    from choline.client import CholineClient
    from choline_core.settings import CholineSettings
    from choline_provisioner.providers import localbox

    while not run_ids and not done.is_set():
        time.sleep(0.2)
    if done.is_set():
        return
    run_id = run_ids[0]
    with CholineClient.from_settings(CholineSettings()) as api:
        while not done.is_set():
            info = api.get_run(run_id)
            points = api.metrics(run_id, ["train/loss"]) if info.state.value == "running" else []
            if points and points[-1].step >= at_step and info.attempts and info.attempts[-1].instance_id:
                instance = info.attempts[-1].instance_id
                say(f"killing box {instance} at step {points[-1].step} (SIGKILL to all its processes)")
                localbox.kill_box(CholineSettings().home / "boxes" / instance)
                return
            time.sleep(0.3)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-kill", action="store_true", help="train without killing the box")
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    run_ids: list[str] = []
    done = threading.Event()
    steps = args.epochs * 45
    if not args.no_kill:
        threading.Thread(target=killer, args=(run_ids, int(steps * 0.4), done), daemon=True).start()
    cmd = [
        sys.executable,
        "-m",
        "choline.cli.main",
        "train.py",
        "--1xcpu",
        "--epochs",
        str(args.epochs),
        "--checkpoint-every",
        "15",
        "--",
        "--threads",
        "1",
    ]
    say(f"choline train.py --1xcpu --epochs {args.epochs} --checkpoint-every 15")
    proc = subprocess.Popen(cmd, cwd=HERE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        sys.stderr.write(line)
        sys.stderr.flush()
        if " queued on " in line and not run_ids:
            run_ids.append(line.split("run ", 1)[1].split()[0])
    rc = proc.wait()
    done.set()
    if not run_ids:
        return rc or 1
    info = json.loads(choline("show", run_ids[0], "--json").stdout or "{}")
    for a in info.get("attempts", []):
        say(
            f"attempt {a['attempt']}: box {a['box_id']}, resumed from step {a['resumed_from_step'] or 0}, "
            f"ended: {a['end_reason']}"
        )
    results = HERE / "choline-runs" / run_ids[0]
    if results.is_dir():
        say(f"results in {results}: {', '.join(sorted(p.name for p in results.iterdir()))}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
