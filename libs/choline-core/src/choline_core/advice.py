"""Contracts of the monitor's advisor (issue 15): an LLM's structured answer about a run, the
advice record the monitor stores, the request/reply messages, and applying a proposed fix.

Core NATS request/reply on ``Subjects.rpc("monitor", method)`` (queue group ``monitor``):

    ``advise``   AdviseRequest(run_id, question?, finding_id?)  -> AdviceList (the new advice, status pending)
    ``advice``   AdviceQuery(run_id, advice_id?, limit, include_context) -> AdviceList (newest first)
    ``policy``   PolicyRequest(run_id, policy?)                  -> PolicyInfo (sets it when given)

An answer is ``AdviceAnswer``: a diagnosis, likely causes, a proposed fix (config changes and/or a
unified diff against the script), a confidence and a recommended action. ``parse_answer`` reads
what a model wrote leniently (code fences, prose around the JSON, ``"high"`` for a confidence,
a dict for the config changes) and raises ``ValueError`` when there is no usable answer in it.

``apply_changes`` turns a run's spec and a fix's config changes into the spec of a new run, with
the list of what changed (the CLI shows it before anything is queued). Light: pydantic only, and
Python 3.10.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError

from .errors import BadSpec
from .events import Event, Model, RunSpec

MONITOR = "monitor"
ADVISE = "advise"
ADVICE = "advice"
POLICY = "policy"

Action = Literal["continue", "pause", "stop", "restart_with_fix", "investigate"]
ACTIONS: tuple[str, ...] = ("continue", "pause", "stop", "restart_with_fix", "investigate")
Policy = Literal["notify", "auto-pause"]
POLICIES: tuple[str, ...] = ("notify", "auto-pause")
Status = Literal["pending", "answered", "degraded", "rate_limited"]
Trigger = Literal["finding", "crash", "on_demand"]


class ConfigChange(Model):
    """One change to the run's configuration. ``target``: ``arg`` (a script flag such as ``--lr``),
    ``env`` (an environment variable) or ``gpus`` (the GPU spec). ``value`` None removes it."""

    target: Literal["arg", "env", "gpus"] = "arg"
    name: str
    value: str | None = None
    reason: str | None = None

    def label(self) -> str:
        if self.target == "env":
            return f"env {self.name}"
        return self.name


class ProposedFix(Model):
    config_changes: list[ConfigChange] = Field(default_factory=list)
    diff: str | None = None  # a unified diff against the run's script
    explanation: str | None = None

    @property
    def empty(self) -> bool:
        return not self.config_changes and not self.diff


class AdviceAnswer(Model):
    """What the advisor says about a run: validated, whoever wrote it."""

    diagnosis: str = Field(min_length=1, max_length=4000)
    likely_causes: list[str] = Field(default_factory=list, max_length=12)
    fix: ProposedFix = Field(default_factory=ProposedFix)
    confidence: float = Field(0.5, ge=0.0, le=1.0)
    recommended_action: Action = "investigate"


class AdviceInfo(Model):
    """An advice record as the CLI, the API and the web page see it.

    ``status``: ``pending`` (being asked), ``answered`` (the model's answer), ``degraded`` (no
    model configured, a timeout, or an answer that did not validate: ``answer`` is then the
    detector's own message and ``error`` says why), ``rate_limited`` (the run had its share).
    ``source``: ``llm`` or ``detector``. ``context`` (the condensed context that was sent) only
    when asked for."""

    id: str
    run_id: str
    finding_id: str | None = None
    trigger: str = "on_demand"
    question: str | None = None
    status: str = "pending"
    source: str | None = None
    model: str | None = None
    answer: AdviceAnswer | None = None
    error: str | None = None
    context_tokens: int | None = None
    created_at: datetime | None = None
    answered_at: datetime | None = None
    latency_s: float | None = None
    context: str | None = None

    @property
    def done(self) -> bool:
        return self.status != "pending"


class AdviseRequest(Event):
    """Ask the advisor about a run: a ``question`` ("what should I try next?") and/or one of its findings."""

    TYPE: ClassVar[str] = "rpc.advise"
    run_id: str
    question: str | None = Field(default=None, max_length=2000)
    finding_id: str | None = None
    by: str | None = None


class AdviceQuery(Event):
    TYPE: ClassVar[str] = "rpc.advice_query"
    run_id: str
    advice_id: str | None = None
    limit: int = 20
    include_context: bool = False


class AdviceList(Event):
    TYPE: ClassVar[str] = "monitor.advice_list"
    advice: list[AdviceInfo] = Field(default_factory=list)


class PolicyRequest(Event):
    """Read (``policy`` None) or set a run's monitor policy: ``notify`` or ``auto-pause``."""

    TYPE: ClassVar[str] = "rpc.monitor_policy"
    run_id: str
    policy: Policy | None = None


class PolicyInfo(Event):
    TYPE: ClassVar[str] = "monitor.policy"
    run_id: str
    policy: str  # in force for the run
    explicit: bool = False  # set for this run (not the installation's default)
    pause_on: list[str] = Field(default_factory=list)  # detectors whose critical findings pause it
    overrides: dict[str, Any] = Field(default_factory=dict)  # the run's detector overrides


# --------------------------------------------------------------------------------------- parsing
_CONFIDENCE_WORDS = {"very high": 0.9, "high": 0.8, "medium": 0.5, "moderate": 0.5, "low": 0.25, "very low": 0.1}
_ACTION_WORDS = {
    "continue": "continue",
    "keep going": "continue",
    "none": "continue",
    "pause": "pause",
    "stop": "stop",
    "cancel": "stop",
    "abort": "stop",
    "restart": "restart_with_fix",
    "restart_with_fix": "restart_with_fix",
    "restart with fix": "restart_with_fix",
    "rerun": "restart_with_fix",
    "apply_fix": "restart_with_fix",
    "apply fix": "restart_with_fix",
    "investigate": "investigate",
}


def extract_json(text: str) -> dict[str, Any]:
    """The first JSON object in ``text`` (a bare object, one in a code fence, or one inside prose)."""
    text = text.strip()
    candidates = [text]
    candidates += re.findall(r"```(?:json|JSON)?\s*(.*?)```", text, flags=re.S)
    start = text.find("{")
    while start != -1 and len(candidates) < 24:
        depth, in_str, esc = 0, False, False
        for i in range(start, len(text)):
            ch = text[i]
            if in_str:
                if esc:
                    esc = False
                elif ch == "\\":
                    esc = True
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    candidates.append(text[start : i + 1])
                    break
        start = text.find("{", start + 1)
    for cand in candidates:
        try:
            obj = json.loads(cand)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    raise ValueError("no JSON object in the answer")


def _confidence(v: Any) -> float:
    if isinstance(v, bool):
        return 0.5
    if isinstance(v, (int, float)):
        x = float(v)
        return max(0.0, min(1.0, x / 100.0 if x > 1.0 else x))
    if isinstance(v, str):
        s = v.strip().lower()
        if s.endswith("%"):
            return _confidence(float(s[:-1] or 0))
        try:
            return _confidence(float(s))
        except ValueError:
            return _CONFIDENCE_WORDS.get(s, 0.5)
    return 0.5


def _action(v: Any) -> str:
    s = str(v or "").strip().lower().replace("-", "_")
    if s in ACTIONS:
        return s
    s = s.replace("_", " ")
    for word, action in _ACTION_WORDS.items():
        if s == word or s.startswith(word):
            return action
    return "investigate"


def _text(v: Any) -> str:
    if isinstance(v, str):
        return v.strip()
    if isinstance(v, (list, tuple)):
        return " ".join(_text(x) for x in v)
    return "" if v is None else json.dumps(v)


def _changes(raw: Any) -> list[dict[str, Any]]:
    """Config changes in the shapes models write: a list of objects, or ``{"--lr": "0.01"}``."""
    items: list[dict[str, Any]] = []
    if isinstance(raw, dict):
        raw = [{"name": k, "value": v} for k, v in raw.items()]
    if not isinstance(raw, list):
        return items
    for c in raw:
        if isinstance(c, str) and "=" in c:
            k, _, v = c.partition("=")
            c = {"name": k, "value": v}
        if not isinstance(c, dict):
            continue
        name = str(c.get("name") or c.get("key") or c.get("flag") or c.get("param") or "").strip()
        if not name:
            continue
        value = c.get("value", c.get("new", c.get("to")))
        target = str(c.get("target") or c.get("kind") or "").strip().lower()
        if name.lower().startswith(("env:", "env.")):
            target, name = "env", name[4:]
        elif name.lower() in ("gpus", "--gpus", "gpu"):
            target, name = "gpus", "gpus"
        elif target not in ("arg", "env", "gpus"):
            target = "env" if re.fullmatch(r"[A-Z][A-Z0-9_]*", name) else "arg"
        if target == "arg" and not name.startswith("-"):
            name = "--" + name.replace("_", "-")
        reason = c.get("reason") or c.get("why")
        items.append(
            {
                "target": target,
                "name": name,
                "value": None if value is None else (json.dumps(value) if isinstance(value, bool) else str(value)),
                "reason": _text(reason) or None,
            }
        )
    return items


def _looks_like_diff(text: str) -> bool:
    return "@@" in text and ("\n+" in text or "\n-" in text)


def parse_answer(text: str) -> AdviceAnswer:
    """A model's reply -> ``AdviceAnswer``; ``ValueError`` when it holds no usable answer."""
    obj = extract_json(text)
    fix_raw = obj.get("fix") or obj.get("proposed_fix") or {}
    if isinstance(fix_raw, str):
        fix_raw = {"explanation": fix_raw}
    if not isinstance(fix_raw, dict):
        fix_raw = {}
    changes = _changes(fix_raw.get("config_changes", fix_raw.get("config", obj.get("config_changes"))))
    diff = fix_raw.get("diff", obj.get("diff"))
    diff = diff if isinstance(diff, str) and _looks_like_diff(diff) else None
    causes = obj.get("likely_causes", obj.get("causes", []))
    if isinstance(causes, str):
        causes = [causes]
    if not isinstance(causes, list):
        causes = []
    data = {
        "diagnosis": _text(obj.get("diagnosis") or obj.get("summary") or obj.get("explanation")),
        "likely_causes": [_text(c)[:500] for c in causes if _text(c)][:12],
        "fix": {
            "config_changes": changes,
            "diff": diff.strip("\n") + "\n" if diff else None,
            "explanation": _text(fix_raw.get("explanation") or fix_raw.get("description")) or None,
        },
        "confidence": _confidence(obj.get("confidence", 0.5)),
        "recommended_action": _action(obj.get("recommended_action", obj.get("action"))),
    }
    try:
        return AdviceAnswer.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"the answer does not validate: {where}: {first['msg']}") from None


ANSWER_SCHEMA: dict[str, Any] = {
    "diagnosis": "what is wrong, in two or three sentences, citing the numbers",
    "likely_causes": ["most likely cause first"],
    "fix": {
        "config_changes": [{"target": "arg|env|gpus", "name": "--lr", "value": "0.003", "reason": "why"}],
        "diff": "a unified diff against the script (--- a/PATH, +++ b/PATH, @@ hunks), or null",
        "explanation": "what the fix does",
    },
    "confidence": "0.0 to 1.0",
    "recommended_action": "|".join(ACTIONS),
}


# --------------------------------------------------------------------------------------- applying
def _find_flag(args: list[str], name: str) -> tuple[int, bool] | None:
    """Where ``name`` is in ``args``: (index, written as ``--name=value``)."""
    for i, a in enumerate(args):
        if a == name:
            return i, False
        if a.startswith(name + "="):
            return i, True
    return None


def _flag_names(name: str) -> list[str]:
    names = [name]
    for alt in (name.replace("_", "-"), name.replace("-", "_")):
        if alt not in names and alt.startswith("--"):
            names.append(alt)
    return names


Change = tuple[str, "str | None", "str | None"]


def apply_changes(spec: RunSpec, changes: list[ConfigChange]) -> tuple[RunSpec, list[Change]]:
    """The spec of a new run with ``changes`` made, and ``[(what, before, after)]`` for each.

    A flag is changed where it is (``--lr 50`` or ``--lr=50``), or added at the end when the run
    did not pass it; a value of None removes it (with its value). Raises ``BadSpec`` for a change
    that cannot be made (a GPU spec that does not parse, an empty name)."""
    from .specs import parse_gpu_spec

    args = list(spec.args)
    env = dict(spec.env)
    gpus = spec.gpus
    done: list[Change] = []
    for c in changes:
        if not c.name.strip():
            raise BadSpec("a proposed change has no name")
        if c.target == "gpus":
            if c.value is None:
                raise BadSpec("a proposed change removes the GPU spec", hint="give a spec such as 1xA100-80GB")
            new = str(parse_gpu_spec(c.value))
            if new != gpus:
                done.append(("gpus", gpus, new))
                gpus = new
        elif c.target == "env":
            before = env.get(c.name)
            if c.value is None:
                env.pop(c.name, None)
            else:
                env[c.name] = c.value
            if before != c.value:
                done.append((f"env {c.name}", before, c.value))
        else:
            where = None
            name = c.name
            for candidate in _flag_names(c.name):
                where = _find_flag(args, candidate)
                if where is not None:
                    name = candidate
                    break
            if where is None:
                if c.value is not None:
                    args += [name, c.value] if c.value != "" else [name]
                    done.append((name, None, c.value))
                continue
            i, inline = where
            has_value = inline or (i + 1 < len(args) and not args[i + 1].startswith("--"))
            before = args[i].split("=", 1)[1] if inline else (args[i + 1] if has_value else "")
            if c.value is None:
                del args[i : i + (1 if inline or not has_value else 2)]
            elif inline:
                args[i] = f"{name}={c.value}"
            elif has_value:
                args[i + 1] = c.value
            else:
                args.insert(i + 1, c.value)
            if before != c.value:
                done.append((name, before, c.value))
    new_spec = spec.model_copy(update={"args": args, "env": env, "gpus": gpus})
    return new_spec, done
