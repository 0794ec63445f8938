"""``choline webhooks add/ls/rm/log/test``: tell another system when something happens.

``add URL --events run.failed,run.succeeded`` prints the signing secret once (deliveries carry
``X-Choline-Signature: v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>``; docs/webhooks.md).
``--format slack`` / ``--format discord`` posts a chat message to an incoming-webhook URL instead.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..output import emit_json, table

EVENTS_HELP = (
    "comma-separated, or repeat: run.started run.recovered run.paused run.succeeded run.failed "
    "run.cancelled finding.raised deployment.ready, or 'all'"
)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "webhooks", help="webhooks: POST to a URL when a run starts, fails, recovers... (add, ls, rm, log)"
    )
    hooks = p.add_subparsers(dest="webhooks_command", metavar="COMMAND")
    q = hooks.add_parser(
        "add",
        help="add a webhook (prints its signing secret once)",
        description="Example: choline webhooks add https://hooks.example.com/ml --events run.failed,run.succeeded",
    )
    q.add_argument("url", help="the http(s) URL to POST to")
    q.add_argument("--events", action="append", required=True, metavar="EVENTS", help=EVENTS_HELP)
    q.add_argument("--format", choices=("choline", "slack", "discord"), default="choline", help="body format")
    q.add_argument("--description", help="a note for yourself")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(handler=cmd_add)
    q = hooks.add_parser("ls", help="list your webhooks with their delivery counts")
    q.add_argument("--all", action="store_true", help="admin only: every user's webhooks")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(handler=cmd_ls)
    q = hooks.add_parser("rm", help="remove a webhook (its pending deliveries are cancelled)")
    q.add_argument("id", help="the webhook's id (see 'choline webhooks ls')")
    q.set_defaults(handler=cmd_rm)
    q = hooks.add_parser("log", help="a webhook's deliveries: each event, each try, newest first")
    q.add_argument("id", help="the webhook's id")
    q.add_argument("--limit", type=int, default=20, help="at most this many deliveries (default 20)")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(handler=cmd_log)
    q = hooks.add_parser("test", help="send a test event (type ping) to a webhook")
    q.add_argument("id", help="the webhook's id")
    q.set_defaults(handler=cmd_test)
    p.set_defaults(handler=lambda args, parser=p: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _client() -> Any:
    from choline.client import CholineClient

    return CholineClient.from_settings()


def parse_events(values: list[str]) -> list[str]:
    from choline.client import WEBHOOK_EVENTS
    from choline_core.errors import BadUsage

    events: list[str] = []
    for value in values:
        for item in value.replace(" ", ",").split(","):
            if not item:
                continue
            if item == "all":
                events += WEBHOOK_EVENTS
            elif item in WEBHOOK_EVENTS:
                events.append(item)
            else:
                raise BadUsage(f"unknown event {item!r}", hint=f"one of: {', '.join(WEBHOOK_EVENTS)}, or all")
    if not events:
        raise BadUsage("no events given", hint="e.g. --events run.failed,run.succeeded")
    return sorted(set(events))


def cmd_add(args: argparse.Namespace) -> int:
    events = parse_events(args.events)
    with _client() as api:
        made = api.create_webhook(args.url, events, format=args.format, description=args.description)
    if args.json:
        emit_json(made.model_dump(mode="json"))
        return 0
    print(made.secret)
    sys.stderr.write(
        f"webhook {made.id} -> {made.url} for {', '.join(made.events)}: the signing secret above is shown once\n"
    )
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    with _client() as api:
        found = api.list_webhooks(all_users=args.all)
    if args.json:
        emit_json([w.model_dump(mode="json") for w in found])
        return 0
    rows = [
        {
            "id": w.id,
            "url": w.url,
            "events": ",".join(w.events),
            "format": w.format,
            "delivered": w.delivered,
            "pending": w.pending,
            "failed": w.failed,
            **({"owner": w.owner} if args.all else {}),
        }
        for w in found
    ]
    columns = ["id", "url", "events", "format", "delivered", "pending", "failed"] + (["owner"] if args.all else [])
    table(rows, columns, empty="no webhooks (add one: choline webhooks add URL --events run.failed)")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with _client() as api:
        api.delete_webhook(args.id)
    print(f"removed {args.id}")
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    with _client() as api:
        found = api.webhook_deliveries(args.id, limit=args.limit)
    if args.json:
        emit_json([d.model_dump(mode="json") for d in found])
        return 0
    rows = [
        {
            "delivery": d.id,
            "event": d.event_type,
            "state": d.state,
            "tries": d.attempts,
            "last": d.last_error or (str(d.last_status) if d.last_status else None),
            "created": f"{d.created_at:%Y-%m-%d %H:%M:%S}",
            "next_try": f"{d.next_at:%H:%M:%S}" if d.state == "pending" and d.next_at else None,
        }
        for d in found
    ]
    table(rows, ["delivery", "event", "state", "tries", "last", "created", "next_try"], empty="no deliveries yet")
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    with _client() as api:
        event_id = api.test_webhook(args.id)
    print(f"queued a ping ({event_id}); see 'choline webhooks log {args.id}'")
    return 0
