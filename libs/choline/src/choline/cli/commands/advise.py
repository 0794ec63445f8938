"""``choline advise``, ``choline apply-fix`` and ``choline monitor``: the monitor's advisor and a run's policy.

    choline advise RUN ["what should I try next?"] [--finding ID] [--json] [--context]
    choline advise RUN --last                   the newest answer, without asking again
    choline apply-fix RUN [--advice ID] [--yes] a new run with the advice's config changes (shown first)
    choline monitor RUN                         the run's policy and detector settings
    choline monitor RUN policy=auto-pause divergence.k=6

Plain clients of the HTTP API (``choline.client``); see docs/advisor.md.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from choline_core.errors import BadUsage, CholineError, UserError

from ..output import emit_json

if TYPE_CHECKING:
    from choline.client import CholineClient
    from choline_core.advice import AdviceInfo

EXIT_OK, EXIT_FAILED = 0, 1


def register(sub: Any) -> None:
    p = sub.add_parser(
        "advise",
        help="ask the advisor what went wrong in a run and what to try next",
        description="Ask the monitor's advisor (a language model, CHOLINE_LLM_* on the control plane) about a "
        "run, running or finished. It reads a condensed context of the run (config, metrics, traceback, "
        "log tail, the script's relevant lines, environment, dataset) and proposes a fix. Example: "
        "choline advise r7k2m4x9qpa 'what should I try next?'",
    )
    p.add_argument("run", help="the run id")
    p.add_argument("question", nargs="?", help="your question (default: what went wrong, what to try next)")
    p.add_argument("--finding", metavar="ID", help="ask about this finding of the run")
    p.add_argument("--last", action="store_true", help="show the newest answer instead of asking again")
    p.add_argument("--context", action="store_true", help="also print the condensed context the model was given")
    p.add_argument("--timeout", type=float, default=180.0, help="wait this long for the answer (default 180 s)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_advise)

    p = sub.add_parser(
        "apply-fix",
        help="start a new run with the config changes the advisor proposed (shown first)",
        description="Start a new run from RUN's spec with the newest advice's config changes (script flags, "
        "environment, GPUs). The changes are shown and confirmed first; --yes confirms without asking. "
        "A proposed diff to the script is saved as a patch for you to apply, never applied here.",
    )
    p.add_argument("run", help="the run id")
    p.add_argument("--advice", metavar="ID", help="this advice instead of the newest one with a fix")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.add_argument("--json", action="store_true", help="print the new run as JSON")
    p.set_defaults(handler=cmd_apply_fix)

    p = sub.add_parser(
        "monitor",
        help="a run's monitor policy (notify | auto-pause) and detector settings",
        description="Show, or set, how the monitor watches a run. policy=auto-pause pauses the run (and "
        "releases its box) on a critical NaN or divergence finding; policy=notify (the default) only reports. "
        "Detector settings as in docs/monitor.md. Example: choline monitor r7k2m4x9qpa policy=auto-pause "
        "divergence.k=6",
    )
    p.add_argument("run", help="the run id ('choline monitor set RUN ...' reads the same)")
    p.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="policy=auto-pause|notify, detector settings")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_monitor)


def client() -> CholineClient:
    from choline.client import CholineClient

    return CholineClient.from_settings()


# --------------------------------------------------------------------------- advise
def cmd_advise(args: argparse.Namespace) -> int:
    with client() as api:
        if args.last:
            found = api.advice(args.run, limit=1, include_context=args.context)
            if not found:
                raise UserError(f"no advice about {args.run} yet", hint=f"ask: choline advise {args.run}")
            info = found[0]
        else:
            asked = api.advise(args.run, args.question, finding_id=args.finding)
            if asked.status == "rate_limited":
                raise UserError(asked.error or "the advisor is rate limited for this run", hint="try again later")
            if not args.json:
                sys.stderr.write(f"choline: asking the advisor about {args.run} ...\n")
            info = api.wait_advice(args.run, asked.id, timeout=args.timeout, include_context=args.context)
    if args.json:
        emit_json(info.model_dump(mode="json", exclude_none=not args.context))
        return EXIT_OK
    if args.context and info.context:
        print(f"--- context sent ({info.context_tokens} tokens, estimated) ---")
        print(info.context)
        print("--- answer ---")
    show_advice(info)
    return EXIT_OK


def show_advice(info: AdviceInfo) -> None:
    a = info.answer
    who = f"{info.model}" if info.source == "llm" else "the detector (no model answer)"
    print(f"advice {info.id} about {info.run_id}: {info.status}, from {who}")
    if info.error:
        print(f"note: {info.error}")
    if a is None:
        return
    print()
    print(a.diagnosis)
    if a.likely_causes:
        print("\nlikely causes:")
        for c in a.likely_causes:
            print(f"  - {c}")
    if a.fix.config_changes:
        print("\nproposed config changes:")
        for ch in a.fix.config_changes:
            value = "(remove)" if ch.value is None else ch.value
            print(f"  {ch.label()} = {value}" + (f"   # {ch.reason}" if ch.reason else ""))
    if a.fix.explanation:
        print(f"\n{a.fix.explanation}")
    if a.fix.diff:
        print("\nproposed change to the script:")
        print(a.fix.diff.rstrip("\n"))
    confidence = f"{a.confidence:.0%}" if info.source == "llm" else "-"
    print(f"\nconfidence {confidence}; recommended: {a.recommended_action.replace('_', ' ')}")
    if a.fix.config_changes:
        print(f"apply it as a new run: choline apply-fix {info.run_id}")


# --------------------------------------------------------------------------- apply-fix
def cmd_apply_fix(args: argparse.Namespace) -> int:
    from choline_core.advice import apply_changes

    with client() as api:
        if args.advice:
            info = api.get_advice(args.run, args.advice)
        else:
            candidates = [
                a
                for a in api.advice(args.run, limit=50)
                if a.status == "answered" and a.answer is not None and not a.answer.fix.empty
            ]
            if not candidates:
                raise UserError(
                    f"no advice about {args.run} proposes a fix", hint=f"ask first: choline advise {args.run}"
                )
            info = candidates[0]
        fix = info.answer.fix if info.answer else None
        if fix is None or fix.empty:
            raise UserError(f"advice {info.id} proposes no fix", hint=f"see it: choline advise {args.run} --last")
        run = api.get_run(args.run)
        patch = None
        if fix.diff:
            patch = Path.cwd() / "choline-runs" / args.run / f"fix-{info.id[:12]}.patch"
            patch.parent.mkdir(parents=True, exist_ok=True)
            patch.write_text(fix.diff)
        if not fix.config_changes:
            raise UserError(
                f"advice {info.id} proposes only a change to the script, saved as {patch}",
                hint=f"apply it to your script (patch -p1 < {patch}) and run it again with 'choline run'",
            )
        new_spec, changes = apply_changes(run.spec, fix.config_changes)
        if not changes:
            raise UserError(f"the run already has every change advice {info.id} proposes; nothing to do")
        out = sys.stderr if args.json else sys.stdout  # with --json, stdout carries the new run only
        say = functools.partial(print, file=out)
        say(f"advice {info.id}: {info.answer.diagnosis if info.answer else ''}")
        say("\nchanges:")
        shown = [(w, "-" if b is None else b, "(removed)" if a is None else a) for w, b, a in changes]
        width = max(len(w) for w, _, _ in shown)
        for w, b, a in shown:
            say(f"  {w:<{width}}  {b}  ->  {a}")
        old_cmd = shlex.join(["choline", "run", run.spec.script, f"--{run.spec.gpus}", *run.spec.args])
        new_cmd = shlex.join(["choline", "run", new_spec.script, f"--{new_spec.gpus}", *new_spec.args])
        say(f"\n- {old_cmd}\n+ {new_cmd}")
        if patch is not None:
            say(f"\nthe advice also proposes a change to the script, saved (not applied) as {patch}")
        if not args.yes:
            if not sys.stdin.isatty():
                raise BadUsage("not confirmed: pass --yes to start the new run without a prompt")
            reply = input("\nstart a new run with these changes? [y/N] ").strip().lower()
            if reply not in ("y", "yes"):
                say("nothing started")
                return EXIT_FAILED
        base = run.name or Path(run.spec.script).stem
        new_spec = new_spec.model_copy(update={"name": f"{base}-fix"[:100], "start_at": None})
        created = api.create_run(new_spec)
        try:
            policy = api.monitor(args.run)
            if policy.explicit:
                api.set_monitor(created.run_id, policy=policy.policy)
        except CholineError:
            pass  # the policy is a convenience; the run is queued either way
    if args.json:
        emit_json(created.model_dump(mode="json"))
    else:
        print(f"\nrun {created.run_id} queued with the fix (follow it: choline logs {created.run_id} -f)")
    return EXIT_OK


# --------------------------------------------------------------------------- monitor
def cmd_monitor(args: argparse.Namespace) -> int:
    words = [args.run, *args.settings]
    if words[0] in ("set", "show") and len(words) > 1:
        words = words[1:]
    run_id, items = words[0], words[1:]
    if "=" in run_id:
        raise BadUsage(f"{run_id!r} is not a run id", hint="choline monitor RUN [policy=auto-pause] [divergence.k=6]")
    policy = None
    settings: list[str] = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise BadUsage(f"{item!r} is not KEY=VALUE", hint="e.g. policy=auto-pause divergence.k=6")
        if key == "policy":
            if value not in ("notify", "auto-pause"):
                raise BadUsage(f"policy must be notify or auto-pause, not {value!r}")
            policy = value
        else:
            settings.append(item)
    with client() as api:
        info = api.set_monitor(run_id, policy=policy, settings=settings) if items else api.monitor(run_id)
    if args.json:
        emit_json(info.model_dump(mode="json"))
        return EXIT_OK
    where = "set for this run" if info.explicit else "the installation's default"
    print(f"policy     {info.policy} ({where})")
    if info.policy == "auto-pause":
        print(f"pauses on  critical findings of: {', '.join(info.pause_on)}")
    if info.overrides:
        flat = [f"{d}.{k}={v}" for d, vals in info.overrides.items() if isinstance(vals, dict) for k, v in vals.items()]
        print(f"settings   {' '.join(flat)}")
    return EXIT_OK
