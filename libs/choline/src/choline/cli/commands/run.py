"""``choline run``: ship a script to a box, stream it, bring its results back.

    choline [run] [CHOLINE OPTIONS] SCRIPT [--GPUSPEC] [SCRIPT ARGS...] [-- SCRIPT ARGS...]

Choline's options go before the script. After the script choline takes only the GPU shorthand
(``--4x3090``, ``--1xA100-80GB``, ``--1xcpu``); every other argument is the script's, and ``--``
ends choline's parsing (a ``--4x3090`` after it goes to the script too).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from choline_core.errors import BadUsage, CholineError, UserError
from choline_core.specs import looks_like_gpu_spec, parse_gpu_spec

HELP_EPILOG = """\
examples:
  choline train.py --4x3090                     rent 4 RTX 3090s on the default provider
  choline run --provider vast --max-price 1.5 train.py --2xH100 --epochs 10
  choline train.py --1xcpu -- --4x3090          '--4x3090' goes to the script, not to choline

After the script, choline reads only the GPU shorthand; every other argument belongs to the
script. Ctrl-C detaches (the run goes on); 'choline logs RUN -f' reattaches.
"""


def register(sub: Any) -> None:
    # Parsing happens in ``main`` (argparse cannot split "options, script, the script's args"
    # the way users type it); this entry shows the command in 'choline --help'.
    sub.add_parser(
        "run", help="run a script on a rented box: choline run [OPTIONS] SCRIPT [--4x3090] [ARGS]", add_help=False
    )


def build_parser() -> argparse.ArgumentParser:
    from ..main import _Parser

    p = _Parser(
        prog="choline run",
        usage="choline [run] [OPTIONS] SCRIPT [--GPUSPEC] [SCRIPT ARGS...]",
        description="Run a training script on a rented machine and stream it here.",
        epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--gpus", metavar="SPEC", help="GPUs to rent: 4x3090, 1xA100-80GB, 2xH100, cpu (default: cpu)")
    p.add_argument("--provider", default=None, help="local | ssh | vast (default: local)")
    p.add_argument("--data", action="append", default=[], metavar="PATH[:NAME]", help="a dataset folder to push")
    p.add_argument("--requirements", type=Path, metavar="FILE", help="the script's pip requirements")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="environment for the script")
    p.add_argument("--max-price", type=float, metavar="USD_PER_H", help="refuse offers above this $/h")
    p.add_argument("--budget", type=float, metavar="USD", help="stop the run when it has cost this much")
    p.add_argument("--at", metavar="TIME", help="start later: ISO time (2026-11-24T03:00) or +30m / +2h")
    p.add_argument("--name", help="a name for the run")
    p.add_argument("--retries", type=int, default=0, help="retry a failing script this many times (default 0)")
    p.add_argument("--detach", action="store_true", help="return at once with the run id")
    p.add_argument("--distributed", action="store_true", help="launch with torchrun on every GPU")
    p.add_argument("--no-pull", action="store_true", help="do not download the results at the end")
    p.add_argument("--json", action="store_true", help="print the run as JSON at the end (or at once with --detach)")
    p.add_argument(
        "--monitor-policy",
        choices=["notify", "auto-pause"],
        help="auto-pause: pause the run on a critical NaN or divergence finding (docs/advisor.md)",
    )
    return p


def split_argv(argv: list[str]) -> tuple[list[str], str, list[str], str | None]:
    """(choline options, script, script args, GPU shorthand) from what the user typed."""
    takes_value = {
        "--gpus",
        "--provider",
        "--data",
        "--requirements",
        "--env",
        "--max-price",
        "--budget",
        "--at",
        "--name",
        "--retries",
        "--monitor-policy",
    }
    opts: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            raise BadUsage("'--' before the script: put choline's options, then the script, then its arguments")
        if tok.startswith("-"):
            opts.append(tok)
            if tok in takes_value:
                if i + 1 >= len(argv):
                    raise BadUsage(f"{tok} needs a value; see 'choline run --help'")
                opts.append(argv[i + 1])
                i += 1
            i += 1
            continue
        break
    if i >= len(argv):
        if any(o in ("-h", "--help") for o in opts):
            return opts, "", [], None
        raise BadUsage("no script given: choline [run] [OPTIONS] SCRIPT [--4x3090] [ARGS]; see 'choline run --help'")
    script = argv[i]
    rest = argv[i + 1 :]
    script_args: list[str] = []
    gpu: str | None = None
    for j, tok in enumerate(rest):
        if tok == "--":
            script_args += rest[j + 1 :]
            break
        if gpu is None and looks_like_gpu_spec(tok):
            gpu = tok[2:]
            continue
        if re.match(r"^--\d+x[A-Za-z0-9_\-]+$", tok):
            parse_gpu_spec(tok[2:])  # meant as a GPU shorthand but mistyped: say so (BadSpec)
        script_args.append(tok)
    return opts, script, script_args, gpu


def parse_at(text: str | None) -> Any:
    from datetime import datetime, timedelta, timezone

    if not text:
        return None
    if text.startswith("+"):
        unit = text[-1]
        try:
            n = float(text[1:-1])
        except ValueError:
            n = -1
        mult = {"s": 1, "m": 60, "h": 3600, "d": 86400}.get(unit)
        if mult is None or n < 0:
            raise BadUsage(f"--at {text!r}: use an ISO time (2026-11-24T03:00) or +30m, +2h, +1d")
        return datetime.now(timezone.utc) + timedelta(seconds=n * mult)
    try:
        ts = datetime.fromisoformat(text)
    except ValueError:
        raise BadUsage(f"--at {text!r}: use an ISO time (2026-11-24T03:00) or +30m, +2h, +1d") from None
    if ts.tzinfo is None:
        ts = ts.astimezone()  # the user's local time
    return ts


def parse_data(items: list[str]) -> list[tuple[Path, str]]:
    """``--data PATH[:NAME]`` values as (folder, dataset name); the name defaults to the folder's."""
    from choline_core.pipeline import check_dataset_name

    from .data import default_name

    out: list[tuple[Path, str]] = []
    for item in items:
        raw, name = item, None
        if ":" in item and not os.path.exists(item):
            raw, name = item.rsplit(":", 1)
        path = Path(raw).expanduser()
        if not path.exists() or not os.access(path, os.R_OK):
            raise UserError(f"--data {item}: {path} does not exist or cannot be read")
        if not path.is_dir():
            raise UserError(f"--data {item}: {path} is not a folder", hint="a dataset is a folder: put the file in one")
        name = check_dataset_name(name) if name else default_name(raw)
        if any(n == name for _, n in out):
            raise BadUsage(f"--data: two datasets named {name!r}; name them apart with PATH:NAME")
        out.append((path, name))
    return out


def parse_env(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise BadUsage(f"--env {item!r}: expected NAME=VALUE")
        out[key] = value
    return out


def main(argv: list[str]) -> int:
    opts, script, script_args, gpu_short = split_argv(argv)
    args = build_parser().parse_args(opts)
    if not script:  # only -h
        return 0
    return run(args, script, script_args, gpu_short)


def run(args: argparse.Namespace, script: str, script_args: list[str], gpu_short: str | None) -> int:
    from choline.client import CholineClient
    from choline.packaging import pack_code, resolve_env
    from choline_core.events import DataMount, RunSpec

    if args.gpus and gpu_short and parse_gpu_spec(args.gpus) != parse_gpu_spec(gpu_short):
        raise BadUsage(f"two GPU specs: --gpus {args.gpus} and --{gpu_short}; give one")
    gpus = str(parse_gpu_spec(gpu_short or args.gpus or "cpu"))
    root = Path.cwd().resolve()
    script_path = (root / script).resolve()
    if not script_path.is_file():
        raise UserError(f"no such script: {script}", hint=f"run choline from the folder that holds it ({root})")
    try:
        rel_script = script_path.relative_to(root).as_posix()
    except ValueError:
        raise UserError(
            f"{script} is outside the current folder {root}",
            hint="cd to your project's folder first: choline ships the current folder",
        ) from None
    datasets = parse_data(args.data)
    env = parse_env(args.env)
    start_at = parse_at(args.at)
    if args.retries < 0:
        raise BadUsage("--retries must be 0 or more")
    if args.requirements is not None and not args.requirements.is_file():
        raise UserError(f"--requirements {args.requirements}: no such file")

    say = _Say(quiet=args.json)
    bundle = pack_code(root)
    envspec = resolve_env(script_path, root, args.requirements)
    with CholineClient.from_settings() as api:
        say(f"code: {len(bundle.files)} files, {_size(bundle.size)} ({bundle.digest[:12]})")
        _upload(api, bundle.digest, "code", bundle.data, say)
        env_bytes = envspec.to_bytes()
        say(f"environment: {len(envspec.requirements)} requirement(s) from {envspec.source}")
        _upload(api, envspec.digest(), "env", env_bytes, say)
        mounts = []
        for path, name in datasets:
            from .data import push_folder

            pushed = push_folder(str(path), name, quiet=args.json)
            mounts.append(DataMount(name=name, manifest=pushed.manifest))
        if mounts and start_at is not None:
            say(f"data pre-staged: {len(mounts)} dataset(s) verified in object storage before the start time")
        spec = RunSpec(
            name=args.name,
            script=rel_script,
            args=script_args,
            gpus=gpus,
            provider=args.provider or "local",
            code_digest=bundle.digest,
            env_digest=envspec.digest(),
            env=env,
            data=mounts,
            max_price=args.max_price,
            budget=args.budget,
            start_at=start_at,
            retries=args.retries,
            distributed=args.distributed,
        )
        info = api.create_run(spec, idempotency_key=uuid.uuid4().hex)
        run_id = info.run_id
        if args.monitor_policy:
            try:
                api.set_monitor(run_id, policy=args.monitor_policy)
            except CholineError as exc:
                say(f"warning: the monitor policy was not set ({exc.one_line()}); 'choline monitor {run_id}'")
        if args.detach:
            if args.json:
                from ..output import emit_json

                emit_json(info.model_dump(mode="json"))
            else:
                print(run_id)
            say(f"run {run_id} queued; follow it with 'choline logs {run_id} -f'")
            return 0
        say(f"run {run_id} queued on {spec.provider} {gpus}")
        state = _follow(api, run_id, say)
        if state is None:
            return 0  # detached
        final = api.get_run(run_id)
        if final.state.value == "succeeded" and not args.no_pull:
            _pull(api, run_id, Path.cwd() / "choline-runs" / run_id, say)
        if args.json:
            from ..output import emit_json

            emit_json(final.model_dump(mode="json"))
        else:
            _summary(final, say)
        return 0 if final.state.value == "succeeded" else 1


class _Say:
    """Choline's own progress lines go to stderr, so stdout carries only the script's output."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def __call__(self, text: str) -> None:
        if not self.quiet:
            sys.stderr.write(f"choline: {text}\n")
            sys.stderr.flush()


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"


def _upload(api: Any, digest: str, kind: str, data: bytes, say: _Say) -> None:
    import httpx

    ticket = api.code_upload(digest, kind)
    if ticket.exists:
        say(f"{kind}: unchanged, nothing to upload")
        return
    if not ticket.url:
        raise CholineError(f"the gateway gave no upload URL for the {kind}")
    t0 = time.monotonic()
    try:
        resp = httpx.put(ticket.url, content=data, timeout=httpx.Timeout(30.0, write=600.0))
    except httpx.TransportError as exc:
        raise CholineError(f"uploading the {kind} failed: {exc}", hint="check 'choline status'") from exc
    if resp.status_code >= 300:
        raise CholineError(f"uploading the {kind} failed: HTTP {resp.status_code}")
    dt = max(time.monotonic() - t0, 1e-3)
    if len(data) > 1_000_000:
        say(f"{kind}: uploaded {_size(len(data))} in {dt:.1f}s ({_size(int(len(data) / dt))}/s)")


def _follow(api: Any, run_id: str, say: _Say) -> str | None:
    """Stream the run until it ends. Returns its final state, or ``None`` when the user detached."""
    attempt: int | None = None
    state: str | None = None
    previous = signal.getsignal(signal.SIGINT)
    try:
        for event in api.follow_logs(run_id):
            if event.kind == "line" and event.line is not None:
                line = event.line
                if attempt is not None and line.attempt != attempt:
                    say(f"--- attempt {line.attempt} ---")
                attempt = line.attempt
                if line.stream == "agent":
                    say(line.text)
                else:
                    out = sys.stderr if line.stream == "stderr" else sys.stdout
                    out.write(line.text + "\n")
                    out.flush()
            elif event.kind == "state" and event.state is not None:
                state = event.state.value
                say(f"{state}{f' ({event.reason})' if event.reason else ''}")
            elif event.kind == "end":
                state = event.state.value if event.state is not None else state
                break
    except KeyboardInterrupt:
        say(f"detached; the run goes on. Reattach: choline logs {run_id} -f   stop it: choline stop {run_id}")
        return None
    finally:
        signal.signal(signal.SIGINT, previous)
    return state


def _pull(api: Any, run_id: str, dest: Path, say: _Say) -> None:
    from .runs import _safe_path, _sha256

    found = api.artifacts(run_id)
    files = [*found.files, *([found.bundle] if found.bundle else [])]
    total = 0
    for f in files:
        if not f.url:
            continue
        target = _safe_path(dest, f.path)
        total += api.download(f.url, target)
        if f.sha256 and _sha256(target) != f.sha256:
            target.unlink()
            raise CholineError(f"{f.path} arrived corrupted", hint=f"run 'choline pull {run_id}' again")
    if files:
        say(f"results: {len(files)} file(s), {_size(total)} in {dest}")


def _summary(info: Any, say: _Say) -> None:
    duration = (info.updated_at - info.created_at).total_seconds()
    attempts = len(info.attempts)
    parts = [f"run {info.run_id} {info.state.value}", f"{duration:.0f}s", f"${info.cost:.4f}"]
    if attempts > 1:
        parts.append(f"{attempts} attempts")
    if info.reason and info.state.value != "succeeded":
        parts.append(info.reason)
    say(", ".join(parts))
