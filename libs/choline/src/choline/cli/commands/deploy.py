"""Serving models: ``choline deploy model NAME[:VERSION]``, ``choline predict NAME``, ``choline deployments
ls``, ``choline undeploy NAME``, ``choline rollback NAME``, and ``choline serve BUNDLE`` (a bundle on this
machine, no control plane).

``deploy model`` asks the deploy service to start serving processes, waits until every one answers and prints
the gateway's URL (one URL, your API token) and the direct URLs of the replicas.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..output import emit_json, table


def register(sub: Any) -> None:
    p = sub.add_parser("deploy", help="deploy model NAME[:VERSION]: serve a model over HTTP")
    kinds = p.add_subparsers(dest="deploy_command", metavar="WHAT")
    q = kinds.add_parser(
        "model",
        help="serve a model version (default: the newest) and print its URL",
        description="choline deploy model digits  |  choline deploy model digits:2 --replicas 2 --max-batch 64",
    )
    q.add_argument("ref", metavar="NAME[:VERSION]", help="a model (see 'choline models ls')")
    q.add_argument("--name", default=None, help="the deployment's name (default: the model's)")
    where = q.add_mutually_exclusive_group()
    where.add_argument(
        "--local", action="store_true", help="serving processes on the control plane's machine (default)"
    )
    where.add_argument("--gpus", default=None, metavar="SPEC", help="on a rented box, e.g. 1x3090")
    q.add_argument("--provider", default="local", help="with --gpus: local, ssh or vast (default local)")
    q.add_argument("--replicas", type=int, default=1, help="serving processes (default 1)")
    q.add_argument("--max-batch", type=int, default=32, help="most samples in one forward pass (default 32)")
    q.add_argument("--max-wait-ms", type=float, default=2.0, help="how long a batch waits to fill (default 2)")
    q.add_argument("--timeout-s", type=float, default=30.0, help="per-request timeout (default 30)")
    q.add_argument("--no-wait", action="store_true", help="return at once (state deploying)")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(handler=cmd_deploy)
    p.set_defaults(handler=lambda args, parser=p: _usage(parser))

    q = sub.add_parser(
        "predict",
        help="a prediction from a deployment: --json '{...}' or --file F",
        description="choline predict digits --json '{\"pixels\": [0, 0, 5, 13, ...]}'",
    )
    q.add_argument("name", help="the deployment")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--json", dest="body", metavar="JSON", help="the model's inputs as a JSON object")
    src.add_argument("--file", metavar="F", help="a file holding that JSON ('-': standard input)")
    q.add_argument("--batch", action="store_true", help='the body is {"instances": [...]}: several predictions')
    q.set_defaults(handler=cmd_predict)

    q = sub.add_parser("deployments", help="deployments: ls")
    deps = q.add_subparsers(dest="deployments_command", metavar="COMMAND")
    r = deps.add_parser("ls", help="your deployments: model, version, state, replicas, URLs")
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.set_defaults(handler=cmd_ls)
    q.set_defaults(handler=lambda args, parser=q: _usage(parser))

    q = sub.add_parser("undeploy", help="stop a deployment: every serving process, every box")
    q.add_argument("name")
    q.set_defaults(handler=cmd_undeploy)

    q = sub.add_parser("rollback", help="serve the previous version again (the current one keeps serving until then)")
    q.add_argument("name")
    q.add_argument("--no-wait", action="store_true", help="return at once")
    q.set_defaults(handler=cmd_rollback)

    q = sub.add_parser(
        "serve",
        help="serve a bundle on this machine, without a control plane (python -m choline.serve)",
        add_help=False,
    )
    q.add_argument("args", nargs=argparse.REMAINDER)
    q.set_defaults(handler=cmd_serve)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _client() -> Any:
    from choline.client import CholineClient

    return CholineClient.from_settings()


def _urls(api: Any, d: Any) -> dict[str, Any]:
    return {
        "url": f"{api.base_url}/v1/deployments/{d.name}/predict",
        "direct": [r.url for r in d.replicas if r.url and r.state == "ready"],
    }


def cmd_deploy(args: argparse.Namespace) -> int:
    from choline_core.errors import BadUsage

    from .models import parse_ref

    name, version = parse_ref(args.ref)
    if args.replicas < 1 or args.max_batch < 1 or args.max_wait_ms < 0 or args.timeout_s <= 0:
        raise BadUsage("--replicas and --max-batch must be >= 1, --max-wait-ms >= 0, --timeout-s > 0")
    config: dict[str, Any] = {
        "replicas": args.replicas,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "timeout_s": args.timeout_s,
    }
    if args.provider != "local" and not args.gpus:
        raise BadUsage(
            "--provider is for a rented box: give --gpus SPEC too", hint="e.g. --gpus 1x3090 --provider vast"
        )
    if args.gpus:
        from choline_core.errors import BadSpec
        from choline_core.specs import parse_gpu_spec

        try:
            parse_gpu_spec(args.gpus)
        except (BadSpec, ValueError) as exc:
            raise BadUsage(str(exc)) from None
        config.update(gpus=args.gpus, provider=args.provider)
    with _client() as api:
        d = api.deploy(name, version, name=args.name, **config)
        deployment = d.name
        if not args.no_wait:
            sys.stderr.write(f"deploying {name}:{d.version} as {deployment} ...\n")
            d = api.wait_deployment(deployment)
        urls = _urls(api, d)
    if args.json:
        emit_json({**d.model_dump(mode="json"), **urls})
        return 0
    if args.no_wait:
        print(f"{deployment}: {d.state} ({name}:{d.version}); see 'choline deployments ls'")
        return 0
    print(urls["url"])
    sys.stderr.write(
        f"{deployment} serves {d.model}:{d.version} ({len(d.replicas)} replica(s)); "
        f"direct: {', '.join(urls['direct']) or '-'}\n"
        f"try: choline predict {deployment} --json '{{...}}'  (the inputs: choline models show {d.model})\n"
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from choline_core.errors import BadUsage

    if args.file is not None:
        try:
            text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        except OSError as exc:
            raise BadUsage(f"cannot read {args.file}: {exc.strerror or exc}") from None
    else:
        text = args.body
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise BadUsage(f"the input is not JSON: {exc}", hint="""e.g. --json '{"pixels": [0, 1, ...]}'""") from None
    with _client() as api:
        out = api.predict(args.name, body, batch=args.batch)
    emit_json(out)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    with _client() as api:
        found = api.list_deployments()
        urls = {d.name: _urls(api, d) for d in found}
    if args.json:
        emit_json([{**d.model_dump(mode="json"), **urls[d.name]} for d in found])
        return 0
    rows = [
        {
            "name": d.name,
            "model": f"{d.model}:{d.version}",
            "state": d.state,
            "replicas": f"{sum(r.state == 'ready' for r in d.replicas)}/{d.config.replicas}",
            "previous": d.previous_version,
            "url": urls[d.name]["url"],
            "reason": d.reason,
        }
        for d in found
    ]
    table(rows, ["name", "model", "state", "replicas", "previous", "url", "reason"], empty="no deployments")
    return 0


def cmd_undeploy(args: argparse.Namespace) -> int:
    with _client() as api:
        d = api.undeploy(args.name)
    print(f"{d.name}: removed")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    with _client() as api:
        d = api.rollback(args.name)
        if not args.no_wait:
            sys.stderr.write(f"rolling {d.name} back to version {d.version} ...\n")
            d = api.wait_deployment(d.name)
    print(f"{d.name}: {d.model}:{d.version} {d.state}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from choline.serve.server import main

    return main(args.args)
