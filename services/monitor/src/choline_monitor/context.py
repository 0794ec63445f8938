"""The condensed context the advisor sends a model: what a run is, what went wrong, within a budget.

``RunMaterial`` is everything gathered about a run (``sources.py`` fills it from the provisioner,
the bus's streams, object storage and the syncer); ``build_context()`` turns it into one text of
sections, most important first, that fits ``budget`` tokens:

====================  ===================================================================
section               what
====================  ===================================================================
question / finding    the user's question, the finding's message and evidence
run                   script, arguments, GPUs, state, attempts (why each ended), env
traceback             the crash's traceback (from the attempt's end, or the log)
metrics               per key: first, best, worst, last with their steps, NaN count, and
                      a downsampled series (medians of equal step buckets)
script                the relevant lines of the training script, numbered: the lines the
                      traceback names, the argparse flags, optimizer, learning rate, loss,
                      clipping, data loading (the whole script when it is short)
log tail              the last lines of output
environment           Python, torch, requirements
dataset               size, files, modality, labels (first for model-choice questions)
other findings        the run's other findings, one line each
====================  ===================================================================

When everything does not fit, the lowest sections shrink first (logs keep their tail, lists
their head), down to a floor, and then go. Tokens are estimated, not counted: about 3.5
characters per token for ASCII (code, numbers and JSON tokenize at 3 to 4 characters per
token with the common BPE vocabularies, so this errs towards more tokens) and one per other
character. No tokenizer download is needed.

Secrets never enter the context: environment values whose names look secret (``*KEY*``,
``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*``, ...) are shown as ``***``, those values are also
replaced wherever else they appear (a script that printed one), and ``scrub()`` replaces text
that looks like a credential (API keys with known prefixes, JWTs, private keys, URL
passwords, ``key = value`` assignments to secret-looking names, long mixed-case random
strings), plus every secret a settings object of this process registered for log redaction.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from choline_core.logs import redact
from choline_core.rpc import RunInfo

DEFAULT_BUDGET = 6000

SYSTEM_PROMPT = """\
You are choline's training-run advisor. Choline runs machine-learning training scripts on rented \
GPUs; its monitor watches each run and raises findings (NaN loss, divergence, stalls, crashes...). \
You get a condensed context of one run: a finding or the user's question, the run's configuration, \
its metrics, the traceback and last log lines, the relevant lines of the training script, its \
environment, and its dataset. Explain what went wrong and propose a fix the user can apply as a \
new run.

Answer with one JSON object and nothing else, in this shape:
{schema}

Rules:
- Cite the numbers in the context (steps, values) in the diagnosis. If the context does not \
support a conclusion, say so and lower the confidence.
- config_changes may only change the script's command-line flags (target "arg", e.g. "--lr"; \
use the flags the script defines), environment variables (target "env") or the GPU spec \
(target "gpus", e.g. "1xA100-80GB").
- Code changes go in "diff" as a unified diff against the script's path as shown; null when \
a config change is enough.
- recommended_action: "pause" (stop paying for a run that cannot recover), "continue", "stop", \
"restart_with_fix" (apply the fix as a new run), or "investigate".
"""


# --------------------------------------------------------------------------------------- tokens
def estimate_tokens(text: str) -> int:
    """A conservative estimate of the tokens ``text`` costs (see the module's docstring)."""
    if not text:
        return 0
    other = sum(1 for ch in text if ord(ch) > 127)
    return math.ceil((len(text) - other) / 3.5) + other


# --------------------------------------------------------------------------------------- secrets
SECRET_NAME = re.compile(
    r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|PWD|CREDENTIAL|AUTH|COOKIE|SESSION|PRIVATE|SIGNATURE|DSN|CREDS)", re.I
)
_SECRET_PATTERNS = [
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.S),
    re.compile(r"\b(?:sk|rk|pk)-(?:[A-Za-z0-9]+-)*[A-Za-z0-9_\-]{16,}"),  # OpenAI / Anthropic / Stripe style
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}|\bgithub_pat_[A-Za-z0-9_]{20,}"),
    re.compile(r"\bhf_[A-Za-z0-9]{20,}"),
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"\bxox[abprs]-[A-Za-z0-9\-]{10,}"),
    re.compile(r"\bglpat-[A-Za-z0-9_\-]{16,}"),
    re.compile(r"\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{4,}"),  # JWT
    re.compile(r"\bS[UOACN][A-Z2-7]{50,}\b"),  # NATS nkey seeds
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9_\-.=+/]{8,}"),
]
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.\-]*://[^/\s:@]+):[^@\s/]+@", re.I)
_ASSIGNMENT = re.compile(r"""(\b[A-Za-z_][\w.\-]*["']?\s*[:=]\s*["']?)([^\s"',;)}\]]{4,})""")
_SECRET_WORDS = {"apikey", "token", "secret", "password", "passwd", "pwd", "credential", "credentials"}
_SECRET_WORDS |= {"auth", "creds", "accesskey", "secretkey", "privatekey", "bearer", "passphrase"}
_NUMBER = re.compile(r"^[-+]?[\d.,]+(?:e[-+]?\d+)?%?$", re.I)


def _secret_assignment(m: re.Match[str]) -> str:
    name, value = m.group(1), m.group(2)
    words = {w for w in re.split(r"[_\-.\s\"':=]+", name.lower()) if w}
    joined = re.sub(r"[^a-z]", "", name.lower())
    # "key" alone is a metric's or a dict's key; "api_key", "encryption_key", "wandb_key" are secrets
    compound_key = "key" in words and len(words) > 1 and not words & {"metric", "sort", "cache", "dict", "group"}
    secretish = bool(words & _SECRET_WORDS) or compound_key or any(w in joined for w in ("apikey", "secretkey"))
    if not secretish or value == "***" or _NUMBER.match(value):
        return m.group(0)
    return name + "***"


_RANDOM = re.compile(r"(?<![A-Za-z0-9+/_\-])[A-Za-z0-9+/_\-]{32,}={0,2}(?![A-Za-z0-9+/_\-])")


def _looks_random(s: str) -> bool:
    """Mixed case letters and digits, no long runs of one class: a key, not a word or a hex digest."""
    has_upper = any(c.isupper() for c in s)
    has_lower = any(c.islower() for c in s)
    has_digit = any(c.isdigit() for c in s)
    if not (has_upper and has_lower and has_digit):
        return False
    is_path = "/" in s and s.count("/") >= 2 and not any(c in s for c in "+=")
    return not is_path


def secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def scrub(text: str, extra: set[str] | None = None) -> str:
    """``text`` with everything that looks like a credential replaced by ``***``."""
    if not text:
        return text
    text = redact(text)
    for value in sorted(extra or (), key=len, reverse=True):
        if len(value) >= 4:
            text = text.replace(value, "***")
    for pat in _SECRET_PATTERNS:
        text = pat.sub("***", text)
    text = _URL_PASSWORD.sub(r"\1:***@", text)
    text = _ASSIGNMENT.sub(_secret_assignment, text)
    text = _RANDOM.sub(lambda m: "***" if _looks_random(m.group(0)) else m.group(0), text)
    return text


# --------------------------------------------------------------------------------------- material
@dataclass
class MetricSummary:
    """One metric key of a run, condensed: counts, notable points, a downsampled series."""

    key: str
    count: int = 0
    nonfinite: int = 0
    first_nonfinite_step: int | None = None
    first: tuple[int, float] | None = None
    last: tuple[int, float] | None = None
    low: tuple[int, float] | None = None
    high: tuple[int, float] | None = None
    points: list[tuple[int, float | None]] = field(default_factory=list)  # (step, value) in step order

    @classmethod
    def of(cls, key: str, points: list[tuple[int, float | None]]) -> MetricSummary:
        s = cls(key, points=sorted(points, key=lambda p: p[0]))
        for step, v in s.points:
            s.count += 1
            if v is None or not math.isfinite(v):
                s.nonfinite += 1
                if s.first_nonfinite_step is None:
                    s.first_nonfinite_step = step
                continue
            if s.first is None:
                s.first = (step, v)
            s.last = (step, v)
            if s.low is None or v < s.low[1]:
                s.low = (step, v)
            if s.high is None or v > s.high[1]:
                s.high = (step, v)
        return s

    def series(self, buckets: int) -> list[tuple[int, float | None]]:
        """Medians of ``buckets`` equal runs of points (NaN when a bucket has no finite value)."""
        pts = self.points
        if len(pts) <= buckets:
            return list(pts)
        out: list[tuple[int, float | None]] = []
        for b in range(buckets):
            lo, hi = b * len(pts) // buckets, (b + 1) * len(pts) // buckets
            chunk = pts[lo:hi]
            vals = sorted(v for _, v in chunk if v is not None and math.isfinite(v))
            out.append((chunk[-1][0], vals[len(vals) // 2] if vals else None))
        return out

    def render(self, buckets: int) -> str:
        def pt(p: tuple[int, float] | None) -> str:
            return "-" if p is None else f"{_num(p[1])} @{p[0]}"

        head = f"{self.key}: {self.count} points"
        if self.points:
            head += f", steps {self.points[0][0]}..{self.points[-1][0]}"
        head += f"; first {pt(self.first)}, min {pt(self.low)}, max {pt(self.high)}, last {pt(self.last)}"
        if self.nonfinite:
            head += f"; NaN/inf {self.nonfinite} (first @{self.first_nonfinite_step})"
        if buckets > 0 and self.count > 3:
            ser = " ".join(f"{s}:{_num(v) if v is not None else 'nan'}" for s, v in self.series(buckets))
            head += f"\n  series (step:median): {ser}"
        return head


def _num(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.3g}"
    return f"{v:.4g}"


@dataclass
class DatasetCard:
    """What a model-choice question needs to know about a dataset."""

    name: str
    manifest: str | None = None
    size: int | None = None
    files: int | None = None
    modality: str | None = None
    extensions: dict[str, int] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)  # class folder -> files
    splits: dict[str, int] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)  # a CSV's header
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        parts = [f"{self.name}" + (f" ({self.manifest[:12]})" if self.manifest else "")]
        if self.size is not None:
            parts.append(f"{_bytes(self.size)}, {self.files} files")
        if self.modality:
            parts.append(f"modality: {self.modality}")
        if self.extensions:
            parts.append("file types: " + ", ".join(f"{k} {v}" for k, v in list(self.extensions.items())[:8]))
        if self.splits:
            parts.append("splits: " + ", ".join(f"{k} {v}" for k, v in self.splits.items()))
        if self.labels:
            shown = list(self.labels.items())[:40]
            more = len(self.labels) - len(shown)
            parts.append(
                f"labels ({len(self.labels)} class folders): "
                + ", ".join(f"{k} {v}" for k, v in shown)
                + (f", ... {more} more" if more > 0 else "")
            )
        if self.columns:
            parts.append("columns: " + ", ".join(self.columns[:40]))
        parts += self.notes
        return "\n  ".join(parts)


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


@dataclass
class RunMaterial:
    """Everything gathered about a run before condensing; each part may be missing."""

    run_id: str
    run: RunInfo | None = None
    question: str | None = None
    finding: dict[str, Any] | None = None
    findings: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, MetricSummary] = field(default_factory=dict)
    logs: list[str] = field(default_factory=list)
    traceback: str | None = None
    script_path: str | None = None
    script: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # other files the traceback names
    environment: dict[str, Any] = field(default_factory=dict)
    datasets: list[DatasetCard] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be gathered, and why

    def secret_values(self) -> set[str]:
        """Values of environment variables whose names look secret (replaced wherever they appear)."""
        out: set[str] = set()
        if self.run is not None:
            for k, v in self.run.spec.env.items():
                if secret_name(k) and v:
                    out.add(v)
        return out


# --------------------------------------------------------------------------------------- sections
@dataclass
class Section:
    title: str
    lines: list[str]
    keep: str = "head"  # which end survives a cut: head | tail
    cap: int = 1000  # tokens at most
    floor: int = 60  # below this it goes rather than shrinks

    def text(self) -> str:
        return f"## {self.title}\n" + "\n".join(self.lines)

    def tokens(self) -> int:
        return estimate_tokens(self.text())

    def shrink_to(self, tokens: int) -> bool:
        """Drop lines (from the end that does not matter) until it fits; False when it cannot."""
        if self.tokens() <= tokens:
            return True
        lines = list(self.lines)
        cut = 0
        while lines and estimate_tokens(f"## {self.title}\n" + "\n".join(lines) + "\n... (99999 lines cut)") > tokens:
            if len(lines) == 1:
                # one long line: cut its text
                room = max(0, int((tokens - estimate_tokens(f"## {self.title}\n... (cut)")) * 3.5) - 8)
                if room < 20:
                    return False
                line = lines[0]
                lines[0] = ("..." + line[-room:]) if self.keep == "tail" else (line[:room] + "...")
                break
            if self.keep == "tail":
                lines.pop(0)
            else:
                lines.pop()
            cut += 1
        if not lines:
            return False
        note = f"... ({cut} lines cut)"
        self.lines = [note, *lines] if self.keep == "tail" else [*lines, note]
        return self.tokens() <= tokens


_METRIC_ORDER = ("loss", "val_loss", "grad_norm", "lr", "throughput", "acc", "accuracy")


def _metric_rank(key: str) -> tuple[int, str]:
    k = key.lower()
    for i, name in enumerate(_METRIC_ORDER):
        if k == name or name in k:
            return i, key
    return len(_METRIC_ORDER), key


_TB_FILE = re.compile(r'File "([^"]+)", line (\d+)')
_KEYWORDS = re.compile(
    r"add_argument|\blr\b|learning_rate|optim|Adam|SGD|RMSprop|clip|zero_grad|backward|\.step\(|loss|"
    r"sched|DataLoader|num_workers|batch_size|autocast|GradScaler|float16|bfloat16|half\(|dropout|weight_decay|"
    r"\.log\(|choline\.|epochs|init\(|momentum|warmup|torch\.load|\.cuda\(|\.to\(",
)


def relevant_lines(source: str, path: str | None, traceback: str | None, *, whole_under: int = 80) -> list[str]:
    """The numbered lines of ``source`` worth showing, in order, with ``...`` between windows.

    The whole file when it has under ``whole_under`` lines; otherwise windows around the lines
    the traceback names in this file (+-6), and around lines that set up or drive training
    (+-2). Windows are ranked (traceback first) so a cut from the end keeps the best."""
    lines = source.splitlines()
    width = len(str(len(lines)))

    def num(i: int) -> str:
        return f"{i + 1:>{width}} | {lines[i]}"

    if len(lines) < whole_under:
        return [num(i) for i in range(len(lines))]
    marks: dict[int, int] = {}  # line index -> rank (lower is better)
    if traceback and path:
        base = path.rsplit("/", 1)[-1]
        for file, line in _TB_FILE.findall(traceback):
            if file.endswith("/" + path) or file == path or file.rsplit("/", 1)[-1] == base:
                n = int(line) - 1
                for i in range(max(0, n - 6), min(len(lines), n + 7)):
                    marks[i] = min(marks.get(i, 9), 0)
    doc = _in_strings(lines)
    for i, text in enumerate(lines):
        if _KEYWORDS.search(text) and not text.lstrip().startswith("#") and i not in doc:
            rank = 1 if "add_argument" in text else 2
            for j in range(max(0, i - 2), min(len(lines), i + 3)):
                marks[j] = min(marks.get(j, 9), rank if j == i else rank + 1)
    out: list[str] = []
    prev = -2
    for i in sorted(marks):
        if i != prev + 1 and out:
            out.append("...")
        out.append(num(i))
        prev = i
    return out


def _in_strings(lines: list[str]) -> set[int]:
    """Indices of lines inside (or opening) triple-quoted strings: docstrings mention ``lr`` too."""
    out: set[int] = set()
    quote: str | None = None
    for i, line in enumerate(lines):
        if quote is not None:
            out.add(i)
            if line.count(quote) % 2 == 1:
                quote = None
            continue
        for q in ('"""', "'''"):
            if line.count(q) % 2 == 1:
                quote = q
                out.add(i)
                break
    return out


def _run_lines(run: RunInfo, secret_values: set[str]) -> list[str]:
    spec = run.spec
    out = [
        f"run {run.run_id}"
        + (f" ({run.name})" if run.name else "")
        + f": {run.state.value}"
        + (f" ({run.reason})" if run.reason else ""),
        f"command: python {spec.script} {' '.join(spec.args)}".rstrip(),
        f"gpus: {run.gpus or spec.gpus} on {run.provider or spec.provider}; cost so far ${run.cost:.4f}",
    ]
    if spec.data:
        out.append("data: " + ", ".join(f"{d.name}" + (f"@{d.manifest[:12]}" if d.manifest else "") for d in spec.data))
    if spec.env:
        shown = []
        for k, v in sorted(spec.env.items()):
            shown.append(f"{k}=***" if secret_name(k) or v in secret_values else f"{k}={v}")
        out.append("env: " + " ".join(shown))
    extras = [f"{k}={v}" for k, v in (("max_price", spec.max_price), ("budget", spec.budget)) if v is not None]
    if spec.distributed:
        extras.append("distributed=true")
    if extras:
        out.append("limits: " + " ".join(extras))
    for a in run.attempts[-6:]:
        line = f"attempt {a.attempt}: box {a.box_id or '-'}"
        if a.price_per_hour is not None:
            line += f" ${a.price_per_hour:g}/h"
        if a.resumed_from_step:
            line += f", resumed from step {a.resumed_from_step}"
        if a.last_step is not None:
            line += f", last step {a.last_step}"
        if a.end_reason:
            line += f", ended: {a.end_reason}" + (f" (exit {a.exit_code})" if a.exit_code is not None else "")
        out.append(line)
    return out


def _finding_lines(f: dict[str, Any]) -> list[str]:
    evidence = {k: v for k, v in (f.get("evidence") or {}).items() if k not in ("traceback", "stderr_tail")}
    return [
        f"{f.get('severity', '?')} {f.get('detector', '?')} at step {f.get('step')}: {f.get('message', '')}",
        "evidence: " + json.dumps(evidence, separators=(",", ":"), default=str),
    ]


@dataclass
class Context:
    """The condensed context: the text sent as the user message, and what it holds."""

    text: str
    system: str
    tokens: int  # estimated, system prompt included
    sections: list[str]  # titles of the sections kept
    dropped: list[str]  # titles of the sections that did not fit
    budget: int


def model_choice(question: str | None) -> bool:
    q = (question or "").lower()
    return any(w in q for w in ("model", "architecture", "which", "try next", "what should", "dataset", "bigger"))


def build_context(m: RunMaterial, *, budget: int = DEFAULT_BUDGET, system: str | None = None) -> Context:
    """The run's condensed context within ``budget`` tokens (system prompt included), secrets scrubbed."""
    from choline_core.advice import ANSWER_SCHEMA

    system = system or SYSTEM_PROMPT.format(schema=json.dumps(ANSWER_SCHEMA, indent=1))
    secrets = m.secret_values()
    sections: list[Section] = []
    # 1. what is asked
    ask: list[str] = []
    if m.question:
        ask.append(f"The user asks: {m.question}")
    if m.finding:
        ask += _finding_lines(m.finding)
    if not ask:
        ask.append("The user asks: what went wrong in this run, and what should they try next?")
    sections.append(Section("question" if m.question and not m.finding else "finding", ask, cap=900, floor=40))
    wants_data = model_choice(m.question)
    if wants_data and m.datasets:
        sections.append(Section("dataset", [d.render() for d in m.datasets], cap=500))
    if m.run is not None:
        sections.append(Section("run", _run_lines(m.run, secrets), cap=700))
    if m.traceback:
        sections.append(Section("traceback", m.traceback.strip().splitlines(), keep="tail", cap=1200))
    if m.metrics:
        keys = sorted(m.metrics, key=_metric_rank)
        buckets = 16 if len(keys) <= 6 else 10
        mlines = [m.metrics[k].render(buckets) for k in keys[:24]]
        if len(keys) > 24:
            mlines.append(f"... {len(keys) - 24} more keys: {', '.join(keys[24:60])}")
        sections.append(Section("metrics", mlines, cap=1600))
    if m.script:
        shown = relevant_lines(m.script, m.script_path, m.traceback)
        sections.append(Section(f"script {m.script_path or ''} (numbered; relevant lines)".strip(), shown, cap=1600))
    for path, body in list(m.files.items())[:2]:
        shown = relevant_lines(body, path, m.traceback, whole_under=0)
        sections.append(Section(f"file {path} (lines the traceback names)", shown, cap=500))
    if m.logs:
        tail = m.logs[-200:]
        if m.traceback:  # shown above already: keep its place in the log, not its lines
            tb = {line.strip() for line in m.traceback.splitlines() if line.strip()}
            tail_kept: list[str] = []
            for line in tail:
                if line.strip() in tb:
                    if not tail_kept or tail_kept[-1] != "(the traceback above)":
                        tail_kept.append("(the traceback above)")
                else:
                    tail_kept.append(line)
            tail = tail_kept
        sections.append(Section("log tail", tail, keep="tail", cap=1000))
    if m.environment:
        env_lines = [f"{k}: {v}" for k, v in m.environment.items() if v not in (None, "", [])]
        sections.append(Section("environment", env_lines, cap=300, floor=30))
    if m.datasets and not wants_data:
        sections.append(Section("dataset", [d.render() for d in m.datasets], cap=400))
    others = [f for f in m.findings if not m.finding or f.get("id") != m.finding.get("id")]
    if others:
        lines = [
            f"{f.get('severity')} {f.get('detector')} @step {f.get('step')}: {f.get('message', '')[:200]}"
            for f in others[-10:]
        ]
        sections.append(Section("other findings of this run", lines, cap=400))
    if m.notes:
        sections.append(Section("not available", m.notes, cap=200, floor=20))

    # scrub first (a cut must not leave half a secret behind), then cap each, then fit the total
    for s in sections:
        s.lines = scrub("\n".join(s.lines), secrets).split("\n")
        s.shrink_to(s.cap)
    overhead = estimate_tokens(system) + 40
    intro = f"# Run {m.run_id}: condensed context"

    def total() -> int:
        return overhead + estimate_tokens(intro) + sum(s.tokens() + 1 for s in sections)

    dropped: list[str] = []
    order = list(range(len(sections) - 1, 0, -1))  # lowest priority first; the first section stays
    for i in order:
        excess = total() - budget
        if excess <= 0:
            break
        s = sections[i]
        target = s.tokens() - excess
        if target >= s.floor and s.shrink_to(target):
            continue
        dropped.append(s.title)
        s.lines = []
    kept = [s for s in sections if s.lines]
    if total() > budget and kept:  # only the first section left and still too long
        kept[0].shrink_to(max(20, budget - overhead - estimate_tokens(intro) - 2))
    text = "\n\n".join([intro, *(s.text() for s in kept)])
    if dropped:
        text += "\n\n(left out to fit the budget: " + ", ".join(dropped) + ")"
    text = scrub(text, secrets)
    return Context(
        text=text,
        system=system,
        tokens=estimate_tokens(system) + estimate_tokens(text) + 8,
        sections=[s.title for s in kept],
        dropped=dropped,
        budget=budget,
    )
