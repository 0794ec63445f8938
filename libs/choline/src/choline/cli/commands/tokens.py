"""``choline tokens create/ls/revoke`` and ``choline login URL TOKEN``.

``login`` checks the token against the gateway, then writes ``{"gateway_url", "api_token"}``
0600 to ``$CHOLINE_HOME/secrets/token.json``; every later command (and the training library's
client) uses that gateway. The embedded control plane's first start writes the same file with
its admin token, so ``choline up`` on a fresh ``CHOLINE_HOME`` needs no login.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..output import emit_json, table

TOKEN_FILE = "secrets/token.json"


def register(sub: Any) -> None:
    p = sub.add_parser("tokens", help="API tokens for the gateway: create, ls, revoke")
    tokens = p.add_subparsers(dest="tokens_command", metavar="COMMAND")
    q = tokens.add_parser("create", help="create a token (printed once; keep it safe)")
    q.add_argument("name", help="what the token is for, e.g. ci or laptop")
    q.add_argument("--user", help="admin only: a token for this user (created when new)")
    q.add_argument("--admin", action="store_true", help="admin only: the new user is an admin")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(handler=cmd_create)
    q = tokens.add_parser("ls", help="list your tokens (never the secrets themselves)")
    q.add_argument("--all", action="store_true", help="admin only: every user's tokens")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(handler=cmd_ls)
    q = tokens.add_parser("revoke", help="revoke a token by its id (see 'choline tokens ls')")
    q.add_argument("id", help="the token's id")
    q.set_defaults(handler=cmd_revoke)
    p.set_defaults(handler=lambda args, parser=p: _usage(parser))

    p = sub.add_parser("login", help="use a (remote) gateway: choline login https://choline.example.com TOKEN")
    p.add_argument("url", help="the gateway's URL")
    p.add_argument("token", help="an API token for it ('choline tokens create NAME' there); '-' reads it from stdin")
    p.set_defaults(handler=cmd_login)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _client() -> Any:
    from choline.client import CholineClient

    return CholineClient.from_settings()


def cmd_create(args: argparse.Namespace) -> int:
    with _client() as api:
        made = api.create_token(args.name, user=args.user, admin=args.admin)
    if args.json:
        emit_json(made.model_dump(mode="json"))
        return 0
    print(made.token)
    sys.stderr.write(f"token {made.id} ({made.name}) for {made.user}: shown once, store it now\n")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    with _client() as api:
        found = api.list_tokens(all_users=args.all)
    if args.json:
        emit_json([t.model_dump(mode="json") for t in found])
        return 0
    rows = [
        {
            "id": t.id,
            "name": t.name,
            "user": t.user,
            "prefix": t.prefix + "...",
            "created": f"{t.created_at:%Y-%m-%d %H:%M}",
            "last_used": f"{t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else None,
        }
        for t in found
    ]
    table(rows, ["id", "name", "user", "prefix", "created", "last_used"], empty="no tokens")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    with _client() as api:
        api.revoke_token(args.id)
    print(f"revoked {args.id}")
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    from choline.client import CholineClient
    from choline_core.errors import BadUsage
    from choline_core.settings import choline_home, write_private

    url = args.url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise BadUsage(f"{args.url!r} is not a URL", hint="e.g. choline login https://choline.example.com TOKEN")
    token = sys.stdin.readline().strip() if args.token == "-" else args.token  # '-' keeps it out of shell history
    if not token:
        raise BadUsage("no token given", hint="choline login URL TOKEN, or pipe it in: choline login URL -")
    with CholineClient(url, token, timeout=15) as api:
        me = api.me()  # a wrong token or URL fails here, before anything is written
    path = choline_home() / TOKEN_FILE
    write_private(path, json.dumps({"gateway_url": url, "api_token": token}))
    print(f"logged in to {url} as {me.user}" + (" (admin)" if me.admin else ""))
    return 0
