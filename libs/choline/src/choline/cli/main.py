"""The ``choline`` command.

Subcommands live in ``choline.cli.commands`` modules, each with ``register(sub)``; heavy
imports stay inside the handlers so ``choline --help`` is instant. ``choline train.py ...``
(a script first) means ``choline run train.py ...``.

Exit codes: 0 success, 1 failure, 2 bad usage. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Sequence

from choline_core.errors import BadUsage, CholineError

from .output import error

COMMAND_MODULES = (
    "choline.cli.commands.basic",
    "choline.cli.commands.controlplane",
    "choline.cli.commands.runs",
    "choline.cli.commands.tokens",
    "choline.cli.commands.webhooks",
    "choline.cli.commands.run",
    "choline.cli.commands.data",
    "choline.cli.commands.models",
    "choline.cli.commands.deploy",
    "choline.cli.commands.advise",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise BadUsage(f"{message}; see '{self.prog} --help'")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="choline",
        description="Train and ship ML models on rented GPUs.",
        epilog="Run a script: choline train.py --4x3090  (same as 'choline run train.py --4x3090')",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and (argv[0].endswith(".py") or argv[0].endswith(".sh")):
            argv = ["run", *argv]
        if argv and argv[0] == "run":
            from .commands import run

            return run.main(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.version:
            from choline import __version__

            print(__version__)
            return 0
        if not getattr(args, "handler", None):
            parser.print_help()
            return 2
        rc = args.handler(args)
        return int(rc or 0)
    except CholineError as exc:
        error(exc.one_line())
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the interpreter's flush at exit
        return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
