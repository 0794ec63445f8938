"""``python -m choline_agent``: the agent's entry point.

- ``run --config <box dir>/agent.json``: run one attempt (what the provisioner starts, detached, over SSH);
- ``--version``: print ``AGENT_VERSION``;
- ``--check``: a JSON health report of this box (Python, platform, GPUs, free disk).
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import logging
import platform
import shutil
import signal
import sys

from . import AGENT_VERSION


def _check() -> dict[str, object]:
    gpus = []
    exe = shutil.which("nvidia-smi")
    if exe:
        import subprocess

        try:
            out = subprocess.run(
                [exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
            gpus = [line.strip() for line in out.splitlines() if line.strip()]
        except (OSError, subprocess.TimeoutExpired):
            pass
    free = shutil.disk_usage(".").free
    return {
        "agent_version": AGENT_VERSION,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpus": gpus,
        "disk_free_gb": round(free / 2**30, 1),
        "ok": True,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="choline-agent", description="choline's worker-agent (runs on the box)")
    parser.add_argument("--version", action="store_true", help="print the agent version and exit")
    parser.add_argument("--check", action="store_true", help="print a JSON health report of this box and exit")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run one attempt described by an agent.json")
    run.add_argument("--config", required=True, help="path of the agent.json the provisioner wrote")
    run.add_argument("--log-level", default="INFO", help="the agent's own log level (stderr)")
    args = parser.parse_args(argv)
    if args.version:
        print(AGENT_VERSION)
        return 0
    if args.check:
        print(json.dumps(_check()))
        return 0
    if args.command != "run":
        parser.print_help(sys.stderr)
        return 2
    from choline_core.errors import CholineError

    from .agent import Agent, load_config

    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s choline-agent %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("nats").setLevel(logging.WARNING)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: every thread's stack to stderr
    try:
        config = load_config(args.config)
    except CholineError as exc:
        print(f"choline-agent: {exc.one_line()}", file=sys.stderr)
        return 2

    async def go() -> int:
        return await Agent(config).run()

    return asyncio.run(go())


if __name__ == "__main__":
    sys.exit(main())
