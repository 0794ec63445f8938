"""Commands that read and steer runs through the gateway: ``ls``, ``show``, ``logs``, ``stop``,
``pause``, ``resume``, ``cancel``, ``set``, ``wait``, ``pull``, ``boxes ls``, ``offers``.

All of them are plain clients of the HTTP API (``choline.client``); none imports a service.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from choline_core.errors import BadUsage, StorageError

from ..output import emit_json, table

if TYPE_CHECKING:
    from choline.client import CholineClient
    from choline_core.rpc import RunInfo

EXIT_OK, EXIT_FAILED = 0, 1


def register(sub: Any) -> None:
    p = sub.add_parser("ls", help="list your runs, newest first")
    p.add_argument("--state", action="append", metavar="STATE", help="only runs in this state (repeatable)")
    p.add_argument("--name", help="only runs whose name contains this")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_ls)

    p = sub.add_parser("show", help="a run: status, attempts with reasons, cost, checkpoints")
    p.add_argument("run", help="the run id (see 'choline ls')")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_show)

    p = sub.add_parser("logs", help="a run's output (-f: follow it live until the run ends)")
    p.add_argument("run", help="the run id")
    p.add_argument("-f", "--follow", action="store_true", help="keep streaming new lines until the run ends")
    p.add_argument("--attempt", type=int, help="only this attempt")
    p.set_defaults(handler=cmd_logs)

    for action, text in (
        ("stop", "stop a run: checkpoint, keep its results, release the box"),
        ("pause", "pause a run: checkpoint and release the box (no GPU billed while paused)"),
        ("resume", "resume a paused run on a new box from its last checkpoint"),
        ("cancel", "cancel a run now (its box is released; no final checkpoint)"),
    ):
        p = sub.add_parser(action, help=text)
        p.add_argument("run", help="the run id")
        p.set_defaults(handler=cmd_control, action=action)

    p = sub.add_parser(
        "set",
        help="change a running run: learning rate, epochs (choline set RUN lr=3e-4 epochs=+5)",
        description="Change a live run. Values are numbers or text; '+N' / '-N' are relative "
        "(epochs=+5 adds five epochs). Example: choline set r7k2m4x9qpa lr=3e-4 epochs=+5",
    )
    p.add_argument("run", help="the run id")
    p.add_argument("params", nargs="+", metavar="KEY=VALUE", help="e.g. lr=3e-4 epochs=+5")
    p.set_defaults(handler=cmd_set)

    p = sub.add_parser("wait", help="wait for a run to end; exit 0 only if it succeeded")
    p.add_argument("run", help="the run id")
    p.add_argument("--timeout", type=float, help="give up after this many seconds (exit 1)")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing, just set the exit code")
    p.set_defaults(handler=cmd_wait)

    p = sub.add_parser("pull", help="download a run's artifacts and model bundle into ./choline-runs/RUN/")
    p.add_argument("run", help="the run id")
    p.add_argument("--dest", type=Path, help="download into this folder instead of ./choline-runs/RUN")
    p.set_defaults(handler=cmd_pull)

    p = sub.add_parser("boxes", help="your rented machines")
    boxes = p.add_subparsers(dest="boxes_command", metavar="COMMAND")
    q = boxes.add_parser("ls", help="list your boxes")
    q.add_argument("--all", action="store_true", help="include destroyed boxes")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(handler=cmd_boxes_ls)
    p.set_defaults(handler=lambda args, parser=p: _usage(parser))

    p = sub.add_parser("offers", help="what a GPU spec would rent, cheapest first (choline offers 4x3090)")
    p.add_argument("spec", help="a GPU spec: 4x3090, 1xA100-80GB, cpu")
    p.add_argument("--provider", default="local", help="local, ssh or vast (default local)")
    p.add_argument("--max-price", type=float, help="only offers at most this many $/h")
    p.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_offers)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def client() -> CholineClient:
    from choline.client import CholineClient

    return CholineClient.from_settings()


def _ago(when: datetime | None) -> str:
    if when is None:
        return "-"
    secs = (datetime.now(timezone.utc) - when).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{int(secs // size)}{unit} ago"
    return f"{max(0, int(secs))}s ago"


def _run_row(run: RunInfo) -> dict[str, Any]:
    return {
        "run": run.run_id,
        "name": run.name or run.spec.script,
        "state": run.state.value,
        "gpus": run.gpus or run.spec.gpus,
        "provider": run.provider or run.spec.provider,
        "attempts": len(run.attempts),
        "cost": f"${run.cost:.2f}",
        "created": _ago(run.created_at),
    }


# --------------------------------------------------------------------------- ls / show
def cmd_ls(args: argparse.Namespace) -> int:
    with client() as api:
        page = api.list_runs(states=args.state, name=args.name, limit=args.limit)
    if args.json:
        emit_json([r.model_dump(mode="json") for r in page.runs])
        return EXIT_OK
    table(
        [_run_row(r) for r in page.runs],
        ["run", "name", "state", "gpus", "provider", "attempts", "cost", "created"],
        empty="no runs yet (start one with 'choline train.py --1xcpu')",
    )
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    from choline_core.errors import CholineError, NotFound

    with client() as api:
        run = api.get_run(args.run)
        checkpoints: list[Any] = []
        checkpoints_error = None
        try:
            checkpoints = api.checkpoints(args.run)
        except NotFound:
            checkpoints = []
        except CholineError as exc:  # the run itself is known; say why checkpoints are missing
            checkpoints_error = exc.one_line()
    if args.json:
        out = run.model_dump(mode="json")
        out["checkpoints"] = [c.model_dump(mode="json") for c in checkpoints]
        if checkpoints_error:
            out["checkpoints_error"] = checkpoints_error
        emit_json(out)
        return EXIT_OK
    spec = run.spec
    print(f"run       {run.run_id}" + (f"  ({run.name})" if run.name else ""))
    print(f"state     {run.state.value}" + (f"  ({run.reason})" if run.reason else ""))
    print(f"script    {' '.join([spec.script, *spec.args])}")
    print(f"gpus      {run.gpus or spec.gpus} on {run.provider or spec.provider}")
    print(f"owner     {run.owner}")
    print(f"created   {run.created_at:%Y-%m-%d %H:%M:%S} UTC ({_ago(run.created_at)})")
    print(f"cost      ${run.cost:.4f}")
    print()
    rows = [
        {
            "attempt": a.attempt,
            "box": a.box_id,
            "host": a.host,
            "$/h": a.price_per_hour,
            "started": f"{a.started_at:%H:%M:%S}" if a.started_at else None,
            "ended": f"{a.ended_at:%H:%M:%S}" if a.ended_at else None,
            "reason": a.end_reason + (f" (exit {a.exit_code})" if a.exit_code is not None else "")
            if a.end_reason
            else None,
            "resumed_from": a.resumed_from_step,
            "cost": f"${a.cost:.4f}",
        }
        for a in run.attempts
    ]
    print("attempts")
    table(rows, ["attempt", "box", "host", "$/h", "started", "ended", "reason", "resumed_from", "cost"])
    print()
    print("checkpoints")
    if checkpoints_error:
        print(f"(unavailable: {checkpoints_error})")
    else:
        table(
            [
                {
                    "step": c.step,
                    "attempt": c.attempt,
                    "reason": c.reason,
                    "size": _size(c.size),
                    "files": c.files,
                    "saved": f"{c.created_at:%Y-%m-%d %H:%M:%S}" if c.created_at else None,
                }
                for c in checkpoints
            ],
            ["step", "attempt", "reason", "size", "files", "saved"],
        )
    return EXIT_OK


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


# --------------------------------------------------------------------------- logs
def cmd_logs(args: argparse.Namespace) -> int:
    with client() as api:
        if not args.follow:
            attempt = None
            for line in api.iter_logs(args.run, attempt=args.attempt):
                attempt = _print_line(line, attempt)
            return EXIT_OK
        attempt = None
        state = None
        for event in api.follow_logs(args.run):
            if event.kind == "line" and event.line is not None:
                if args.attempt is None or event.line.attempt == args.attempt:
                    attempt = _print_line(event.line, attempt)
            elif event.kind == "end":
                state = event.state
        if state is not None:
            sys.stderr.write(f"choline: run {args.run} {state.value}\n")
    return EXIT_OK


def _print_line(line: Any, attempt: int | None) -> int:
    if attempt is not None and line.attempt != attempt:
        sys.stderr.write(f"--- attempt {line.attempt} ---\n")
    out = sys.stderr if line.stream in ("stderr", "agent") else sys.stdout
    prefix = "[choline] " if line.stream == "agent" else ""
    out.write(f"{prefix}{line.text}\n")
    out.flush()
    return int(line.attempt)


# --------------------------------------------------------------------------- control
def cmd_control(args: argparse.Namespace) -> int:
    with client() as api:
        api.control(args.run, args.action)
    done = {"stop": "stopping", "pause": "pausing", "resume": "resuming", "cancel": "cancelling"}[args.action]
    print(f"{done} {args.run} (follow it with 'choline logs {args.run} -f')")
    return EXIT_OK


def parse_params(items: list[str]) -> dict[str, Any]:
    """``lr=3e-4 epochs=+5 note=warm`` -> ``{"lr": 0.0003, "epochs": "+5", "note": "warm"}``.

    Relative values (``+N``/``-N``) stay text so the run applies them to its current value."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise BadUsage(f"{item!r} is not KEY=VALUE", hint="e.g. choline set RUN lr=3e-4 epochs=+5")
        raw = raw.strip()
        value: Any = raw
        if raw[0] not in "+-":
            for convert in (int, float):
                try:
                    value = convert(raw)
                    break
                except ValueError:
                    continue
            else:
                if raw.lower() in ("true", "false"):
                    value = raw.lower() == "true"
        params[key] = value
    return params


def cmd_set(args: argparse.Namespace) -> int:
    params = parse_params(args.params)
    with client() as api:
        api.set_params(args.run, params)
    shown = " ".join(f"{k}={v}" for k, v in params.items())
    print(f"sent {shown} to {args.run}")
    return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    with client() as api:
        try:
            run = api.wait(args.run, timeout=args.timeout)
        except TimeoutError as exc:
            if not args.quiet:
                sys.stderr.write(f"choline: error: {exc}\n")
            return EXIT_FAILED
    if not args.quiet:
        print(f"{run.run_id} {run.state.value}" + (f" ({run.reason})" if run.reason else ""))
    return EXIT_OK if run.state.value == "succeeded" else EXIT_FAILED


# --------------------------------------------------------------------------- pull
def _safe_path(root: Path, name: str) -> Path:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise StorageError(f"refusing to write {name!r} outside {root}")
    return root.joinpath(*rel.parts)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cmd_pull(args: argparse.Namespace) -> int:
    dest: Path = args.dest or Path.cwd() / "choline-runs" / args.run
    with client() as api:
        found = api.artifacts(args.run)
        files = [*found.files, *([found.bundle] if found.bundle else [])]
        if not files:
            print(f"{args.run} has no artifacts yet")
            return EXIT_OK
        fetched = skipped = 0
        total = 0
        for f in files:
            target = _safe_path(dest, f.path)
            if (
                target.exists()
                and target.stat().st_size == f.size
                and (f.sha256 is None or _sha256(target) == f.sha256)
            ):
                skipped += 1
                continue
            if not f.url:
                raise StorageError(f"the gateway gave no download URL for {f.path}")
            total += api.download(f.url, target)
            if f.sha256 and _sha256(target) != f.sha256:
                target.unlink()
                raise StorageError(
                    f"{f.path} arrived corrupted (sha256 mismatch)", hint=f"run 'choline pull {args.run}' again"
                )
            fetched += 1
    note = f", {skipped} already here" if skipped else ""
    print(f"pulled {fetched} file(s), {_size(total)}{note} into {dest}")
    return EXIT_OK


# --------------------------------------------------------------------------- boxes / offers
def cmd_boxes_ls(args: argparse.Namespace) -> int:
    with client() as api:
        boxes = api.boxes(include_destroyed=args.all)
    if args.json:
        emit_json(boxes)
        return EXIT_OK
    columns = ["box_id", "run_id", "provider", "state", "gpus", "host", "price_per_hour"]
    table(boxes, columns, empty="no boxes")
    return EXIT_OK


def cmd_offers(args: argparse.Namespace) -> int:
    from choline_core.specs import parse_gpu_spec

    parse_gpu_spec(args.spec)  # a bad spec fails here, with the accepted forms, before any request
    with client() as api:
        offers = api.offers(args.spec, provider=args.provider, max_price=args.max_price, limit=args.limit)
    if args.json:
        emit_json(offers)
        return EXIT_OK
    columns = ["id", "provider", "gpus", "gpu_name", "price_per_hour", "reliability", "location"]
    present = [c for c in columns if any(c in o for o in offers)] or ["id"]
    table(offers, present, empty=f"no offers for {args.spec} on {args.provider}")
    return EXIT_OK
