"""Small commands that need no control plane."""

from __future__ import annotations

import argparse
from typing import Any

from ..output import emit_json


def register(sub: Any) -> None:
    p = sub.add_parser("spec", help="check a GPU spec (4x3090, 1xA100-80GB, cpu) and show how it reads")
    p.add_argument("spec", help="a GPU spec such as 4x3090")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_spec)


def cmd_spec(args: argparse.Namespace) -> int:
    from choline_core.specs import parse_gpu_spec

    spec = parse_gpu_spec(args.spec)
    data = {
        "spec": str(spec),
        "count": spec.count,
        "model": spec.model,
        "memory_gb": spec.memory_gb,
        "cpu": spec.is_cpu,
    }
    if args.json:
        emit_json(data)
    elif spec.is_cpu:
        print("1 CPU box (no GPU)")
    else:
        mem = f" with at least {spec.memory_gb} GB each" if spec.memory_gb else ""
        print(f"{spec.count} x {spec.model}{mem}")
    return 0
