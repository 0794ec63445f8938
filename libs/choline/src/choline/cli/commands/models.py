"""``choline models ls|show|push``: model versions (a successful run's bundle is one; ``push`` adds one made
elsewhere). ``show NAME[:VERSION]`` prints the card: what the model is for, what it takes and gives."""

from __future__ import annotations

import argparse
from typing import Any

from ..output import emit_json, table


def register(sub: Any) -> None:
    p = sub.add_parser("models", help="model versions: ls, show NAME[:VERSION], push PATH")
    models = p.add_subparsers(dest="models_command", metavar="COMMAND")
    q = models.add_parser("ls", help="your models, every version (newest first)")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(handler=cmd_ls)
    q = models.add_parser(
        "show", help="one version's card (default: the newest)", description="choline models show digits:2"
    )
    q.add_argument("ref", metavar="NAME[:VERSION]")
    q.add_argument("--json", action="store_true", help="the version and its whole card as JSON")
    q.set_defaults(handler=cmd_show)
    q = models.add_parser("push", help="register a bundle made elsewhere (.choline-bundle.tar.gz or its folder)")
    q.add_argument("path", help="the bundle tarball or folder")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(handler=cmd_push)
    p.set_defaults(handler=lambda args, parser=p: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _client() -> Any:
    from choline.client import CholineClient

    return CholineClient.from_settings()


def parse_ref(ref: str) -> tuple[str, int | None]:
    from choline_core.deploy import parse_ref as parse
    from choline_core.errors import BadUsage

    try:
        return parse(ref)
    except ValueError as exc:
        raise BadUsage(str(exc), hint="NAME or NAME:VERSION, e.g. digits or digits:2") from None


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def cmd_ls(args: argparse.Namespace) -> int:
    with _client() as api:
        found = api.list_models()
    if args.json:
        emit_json([m.model_dump(mode="json", exclude={"card", "url"}) for m in found])
        return 0
    rows = [
        {
            "name": m.name,
            "version": m.version,
            "source": m.source,
            "run": m.run_id,
            "size": _size(m.size),
            "created": m.created_at.strftime("%Y-%m-%d %H:%M"),
        }
        for m in found
    ]
    empty = "no models (train one, or: choline models push PATH)"
    table(rows, ["name", "version", "source", "run", "size", "created"], empty=empty)
    return 0


def _shape(shape: list[Any]) -> str:
    return "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"


def cmd_show(args: argparse.Namespace) -> int:
    name, version = parse_ref(args.ref)
    with _client() as api:
        m = api.get_model(name, version)
    if args.json:
        emit_json(m.model_dump(mode="json", exclude={"url"}))
        return 0
    card = m.card
    print(f"{m.name}:{m.version}  {card.get('purpose', '')}")
    if card.get("description"):
        print(f"  {card['description']}")
    training = card.get("training") or {}
    run = f"  run: {m.run_id}" if m.run_id else ""
    print(f"  source: {m.source or '-'}{run}  size: {_size(m.size)}  sha256: {m.sha256[:16]}")
    print("inputs:")
    for i in card.get("inputs", []):
        rng = f" in [{i['range'][0]}, {i['range'][1]}]" if i.get("range") else ""
        print(
            f"  {i['name']}: {i['dtype']} {_shape(i.get('shape', []))}{rng}"
            + (f"  ({i['description']})" if i.get("description") else "")
        )
    print("outputs:")
    for o in card.get("outputs") or []:
        labels = o.get("labels")
        shown = f" labels: {', '.join(labels[:12])}{' ...' if len(labels) > 12 else ''}" if labels else ""
        print(f"  {o['name']}: {o.get('kind', 'values')} {_shape(o.get('shape') or [])}{shown}")
    steps = card.get("preprocessing") or []
    if steps:
        print("preprocessing: " + ", ".join(s.get("op", "?") for s in steps))
    for d in training.get("data") or []:
        print(f"data: {d.get('name')}" + (f", {d['examples']} examples" if d.get("examples") else ""))
    final = (card.get("metrics") or {}).get("final") or {}
    if final:
        print(
            "metrics: "
            + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(final.items()))
        )
    print(f"deploy it: choline deploy model {m.name}:{m.version}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    with _client() as api:
        m = api.push_model(args.path)
    if args.json:
        emit_json(m.model_dump(mode="json", exclude={"url"}))
        return 0
    print(f"{m.name}:{m.version}")
    return 0
