"""``python -m vast_emulator --port P --key K [--catalog FILE] [--boxes-dir DIR] [--faults JSON] ...``

Serves the emulated vast.ai API on 127.0.0.1 until SIGTERM/SIGINT, then destroys every
instance it handed out. Prints one line with its URL once it listens (and writes the port to
``--port-file`` when given, for scripts that asked for ``--port 0``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from choline_core.settings import choline_home

from .app import create_app
from .core import Emulator, Faults
from .server import bind


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m vast_emulator",
        description="A vast.ai API emulator whose instances are local SSH boxes (see docs/vast.md).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: a free one, printed)")
    p.add_argument(
        "--key",
        default=os.environ.get("VAST_EMULATOR_KEY"),
        help="the API key clients must send (or VAST_EMULATOR_KEY); required",
    )
    p.add_argument("--catalog", type=Path, default=None, help="JSON offers catalogue (default: a built-in market)")
    p.add_argument(
        "--boxes-dir",
        type=Path,
        default=None,
        help="where instance boxes live (default: $CHOLINE_HOME/vast-emulator/boxes, ~/.choline/... without it)",
    )
    p.add_argument("--faults", default=None, help='initial faults as JSON, e.g. \'{"error_rate": 0.1, "seed": 7}\'')
    p.add_argument("--seed", type=int, default=None, help="random seed for faults (same as faults.seed)")
    p.add_argument("--boot-delay", type=float, default=None, help="seconds every instance stays loading")
    p.add_argument("--ssh-user", default="root", help="login name boxes accept (default root, as on vast.ai)")
    p.add_argument(
        "--base-python",
        default=sys.executable,
        help="interpreter whose packages boxes share ('' for none; default this one)",
    )
    p.add_argument("--port-file", type=Path, default=None, help="write the bound port here once listening")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    return p.parse_args(argv)


def _boxes_dir(arg: Path | None) -> Path:
    return arg if arg is not None else choline_home() / "vast-emulator" / "boxes"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.key:
        print("vast_emulator: --key (or VAST_EMULATOR_KEY) is required", file=sys.stderr)
        return 2
    try:
        faults = Faults.model_validate(json.loads(args.faults)) if args.faults else Faults()
        if args.seed is not None:
            faults.seed = args.seed
        if args.boot_delay is not None:
            faults.boot_delay_s = args.boot_delay
        emulator = Emulator(
            _boxes_dir(args.boxes_dir),
            catalog=args.catalog,
            faults=faults,
            ssh_user=args.ssh_user,
            base_python=args.base_python or None,
        )
    except ValueError as exc:
        print(f"vast_emulator: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = bind(args.host, args.port)
    port = sock.getsockname()[1]
    # no access log: a client sending ?api_key= would have its key written there
    config = uvicorn.Config(create_app(emulator, args.key), log_level=args.log_level, lifespan="on", access_log=False)
    server = uvicorn.Server(config)
    if args.port_file:
        args.port_file.write_text(f"{port}\n")
    print(
        f"vast emulator on http://{args.host}:{port} ({len(emulator.offers)} offers, boxes in {emulator.boxes_dir})",
        flush=True,
    )

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(0)

    # uvicorn catches SIGTERM/SIGINT while it serves, shuts down (its lifespan destroys every
    # instance), then raises the signal again with these handlers back in place: exit cleanly
    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    try:
        server.run(sockets=[sock])
    finally:
        emulator.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
