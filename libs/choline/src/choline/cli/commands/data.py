"""``choline data push | ls | show | pull``: datasets in object storage, chunked and deduplicated.

    choline data push ./images imagenet-mini    # only chunks object storage lacks are sent
    choline data ls [--json]
    choline data show imagenet-mini [--json]    # every version
    choline data pull imagenet-mini ./here [--version DIGEST]

A push or pull that is interrupted (Ctrl-C, a dead laptop) resumes when run again, sending nothing twice.
See docs/datasets.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..output import emit_json, table


def register(sub: Any) -> None:
    p = sub.add_parser("data", help="datasets: push a folder, list, show versions, pull")
    data = p.add_subparsers(dest="data_command", metavar="COMMAND")
    q = data.add_parser("push", help="push a folder as the newest version of a dataset")
    q.add_argument("path", help="the folder to push")
    q.add_argument("name", nargs="?", help="the dataset's name (default: the folder's name)")
    q.add_argument("--json", action="store_true", help="print what moved as JSON")
    q.set_defaults(handler=cmd_push)
    q = data.add_parser("ls", help="your datasets with their newest version")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(handler=cmd_ls)
    q = data.add_parser("show", help="one dataset and every version of it")
    q.add_argument("name")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(handler=cmd_show)
    q = data.add_parser("pull", help="download a dataset into a folder (only what is not there yet)")
    q.add_argument("name")
    q.add_argument("dest", nargs="?", help="the folder (default: ./NAME)")
    q.add_argument("--version", help="a version's manifest digest or a unique prefix (default: the newest)")
    q.add_argument("--json", action="store_true", help="print what moved as JSON")
    q.set_defaults(handler=cmd_pull)
    p.set_defaults(handler=lambda args, parser=p: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _remote() -> Any:
    from choline.client import CholineClient
    from choline.datasets.remote import DatasetRemote

    return DatasetRemote(CholineClient.from_settings())


def _progress(quiet: bool) -> Any:
    from choline.datasets.progress import Progress, RichProgress

    return Progress() if quiet or not sys.stderr.isatty() else RichProgress()


def say(text: str) -> None:
    sys.stderr.write(f"choline: {text}\n")
    sys.stderr.flush()


def default_name(path: str) -> str:
    from choline_core.errors import BadUsage

    name = Path(path).expanduser().resolve().name
    import re

    clean = re.sub(r"[^A-Za-z0-9_.\-]", "-", name).lstrip(".-_") or "data"
    if clean != name:
        raise BadUsage(f"the folder name {name!r} is not a dataset name: give one, e.g. {clean}")
    return clean


def push_folder(path: str, name: str, *, quiet: bool = False) -> Any:
    """Push ``path`` as ``name`` with progress on stderr; returns the ``PushResult`` (also used by ``run``)."""
    from choline.datasets.progress import human
    from choline.datasets.push import push

    remote = _remote()
    try:
        result = push(path, name, remote, progress=_progress(quiet))
    finally:
        remote.close()
        remote.api.close()
    if not quiet:
        if result.packs_sent == 0 and result.new_chunks == 0:
            say(f"dataset {name}: unchanged in object storage ({result.files} files, {human(result.size)})")
        else:
            say(
                f"dataset {name}: version {result.manifest[:12]}, {result.files} files, {human(result.size)}; "
                f"sent {human(result.bytes_sent)} ({result.new_chunks} new chunks in {result.packs_sent} packs) "
                f"in {result.seconds:.1f}s"
            )
    return result


def cmd_push(args: argparse.Namespace) -> int:
    from choline_core.pipeline import check_dataset_name

    name = check_dataset_name(args.name) if args.name else default_name(args.path)
    result = push_folder(args.path, name, quiet=args.json)
    if args.json:
        emit_json(
            {
                "name": result.name,
                "manifest": result.manifest,
                "size": result.size,
                "files": result.files,
                "chunks": result.chunks,
                "new_chunks": result.new_chunks,
                "packs_sent": result.packs_sent,
                "bytes_sent": result.bytes_sent,
                "resumed_packs": result.resumed_packs,
                "seconds": round(result.seconds, 3),
            }
        )
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from choline.datasets.progress import human

    remote = _remote()
    try:
        found = remote.datasets()
    finally:
        remote.api.close()
        remote.close()
    if args.json:
        emit_json([d.model_dump(mode="json") for d in found])
        return 0
    table(
        [
            {
                "name": d.name,
                "version": d.latest.manifest[:12],
                "size": human(d.latest.size),
                "files": d.latest.files,
                "owner": d.owner,
                "pushed": d.latest.created_at.strftime("%Y-%m-%d %H:%M") if d.latest.created_at else None,
            }
            for d in found
        ],
        ["name", "version", "size", "files", "owner", "pushed"],
        empty="(no datasets: 'choline data push PATH NAME')",
    )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from choline.datasets.progress import human

    remote = _remote()
    try:
        info = remote.dataset(args.name)
    finally:
        remote.api.close()
        remote.close()
    if args.json:
        emit_json(info.model_dump(mode="json"))
        return 0
    print(f"{info.name} (owner {info.owner})")
    table(
        [
            {
                "version": v.manifest[:12],
                "size": human(v.size),
                "files": v.files,
                "chunks": v.chunks,
                "packs": v.packs,
                "pushed": v.created_at.strftime("%Y-%m-%d %H:%M:%S") if v.created_at else None,
                "from": v.source,
            }
            for v in info.versions
        ],
        ["version", "size", "files", "chunks", "packs", "pushed", "from"],
    )
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from choline.datasets.progress import human
    from choline.datasets.pull import pull
    from choline_core.pipeline import check_dataset_name

    name = check_dataset_name(args.name)
    dest = Path(args.dest) if args.dest else Path.cwd() / name
    remote = _remote()
    try:
        info, result = pull(name, dest, remote, version=args.version, progress=_progress(args.json))
    finally:
        remote.api.close()
        remote.close()
    if args.json:
        emit_json(
            {
                "name": name,
                "manifest": info.manifest,
                "dest": str(dest.resolve()),
                "files": result.files,
                "size": result.size,
                "fetched_bytes": result.fetched_bytes,
                "local_bytes": result.local_bytes,
                "skipped_bytes": result.skipped_bytes,
                "resumed_bytes": result.resumed_bytes,
                "refetched": result.refetched,
                "seconds": round(result.seconds, 3),
            }
        )
        return 0
    say(
        f"dataset {name} {info.manifest[:12]} in {dest}: {result.files} files, {human(result.size)}; "
        f"downloaded {human(result.fetched_bytes)}, reused {human(result.local_bytes + result.skipped_bytes)} "
        f"already here, {result.seconds:.1f}s"
    )
    return 0
