"""Every NATS subject and JetStream stream choline uses, in one place.

Nothing else spells a subject. All names hang off a prefix (``choline`` by default,
``CHOLINE_SUBJECT_PREFIX``) so that tests, or two installations on one server, never see
each other's messages.

Streams (file storage, so they survive a NATS restart):

=========  ==========================================  ====================================
stream     subjects                                    what
=========  ==========================================  ====================================
RUNS       ``<p>.runs.*.events``, ``<p>.runs.*.control``  lifecycle events and control commands
METRICS    ``<p>.runs.*.metrics``                      metric batches from the agent
LOGS       ``<p>.runs.*.logs``                         stdout/stderr batches from the agent
BOXES      ``<p>.boxes.*.heartbeat``                   last heartbeat per box (1 per subject)
WORK       ``<p>.provision.>``, ``<p>.sync.>``,        requests between services
           ``<p>.deploy.>``
FINDINGS   ``<p>.monitor.>``                           monitor findings
=========  ==========================================  ====================================

Request/reply between services uses core NATS on ``<p>.rpc.<service>.<method>`` (no stream).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DUPLICATE_WINDOW_S = 120.0


@dataclass(frozen=True)
class StreamDef:
    name: str
    subjects: tuple[str, ...]
    max_age_s: float = 0.0  # 0 = forever
    max_msgs_per_subject: int = -1
    duplicate_window_s: float = DUPLICATE_WINDOW_S
    description: str = ""
    extra: dict[str, object] = field(default_factory=dict)


_TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_token(value: str, what: str = "id") -> str:
    """A subject token must not contain '.', '*', '>' or spaces (it would change the route)."""
    if not _TOKEN_RE.match(value):
        raise ValueError(f"{what} {value!r} is not a valid subject token (letters, digits, '_' and '-' only)")
    return value


class Subjects:
    """Subjects and streams under one prefix."""

    def __init__(self, prefix: str = "choline") -> None:
        for part in prefix.split("."):
            check_token(part, "subject prefix")
        self.prefix = prefix
        self._stream_prefix = re.sub(r"[^A-Za-z0-9]", "_", prefix).upper()

    # --- runs ---
    def run_events(self, run_id: str) -> str:
        return f"{self.prefix}.runs.{check_token(run_id, 'run id')}.events"

    def run_metrics(self, run_id: str) -> str:
        return f"{self.prefix}.runs.{check_token(run_id, 'run id')}.metrics"

    def run_logs(self, run_id: str) -> str:
        return f"{self.prefix}.runs.{check_token(run_id, 'run id')}.logs"

    def run_control(self, run_id: str) -> str:
        return f"{self.prefix}.runs.{check_token(run_id, 'run id')}.control"

    def all_run_events(self) -> str:
        return f"{self.prefix}.runs.*.events"

    def all_run_metrics(self) -> str:
        return f"{self.prefix}.runs.*.metrics"

    def all_run_logs(self) -> str:
        return f"{self.prefix}.runs.*.logs"

    def all_run_control(self) -> str:
        return f"{self.prefix}.runs.*.control"

    def run_request(self, run_id: str, method: str) -> str:
        """A box's request/reply to the control plane, scoped to its run (core NATS, no stream).

        The box's credentials allow publishing only under its own run, so a service answering
        here takes the run id from the subject, never from the payload.
        """
        return f"{self.prefix}.runs.{check_token(run_id, 'run id')}.req.{check_token(method, 'method')}"

    def all_run_requests(self, method: str) -> str:
        return f"{self.prefix}.runs.*.req.{check_token(method, 'method')}"

    @staticmethod
    def run_id_of(subject: str) -> str:
        """The run id token of a ``<prefix>.runs.<run>.…`` subject."""
        parts = subject.split(".")
        try:
            return parts[parts.index("runs") + 1]
        except (ValueError, IndexError):
            raise ValueError(f"{subject!r} is not a run subject") from None

    # --- boxes ---
    def box_heartbeat(self, box_id: str) -> str:
        return f"{self.prefix}.boxes.{check_token(box_id, 'box id')}.heartbeat"

    def all_box_heartbeats(self) -> str:
        return f"{self.prefix}.boxes.*.heartbeat"

    # --- work between services ---
    def provision(self, action: str) -> str:
        return f"{self.prefix}.provision.{check_token(action, 'action')}"

    def sync(self, action: str) -> str:
        return f"{self.prefix}.sync.{check_token(action, 'action')}"

    def deploy(self, action: str) -> str:
        return f"{self.prefix}.deploy.{check_token(action, 'action')}"

    def monitor_findings(self) -> str:
        return f"{self.prefix}.monitor.findings"

    def rpc(self, service: str, method: str) -> str:
        return f"{self.prefix}.rpc.{check_token(service, 'service')}.{check_token(method, 'method')}"

    def inbox_prefix(self, box_id: str) -> str:
        """Per-box inbox prefix, so a box only ever receives replies meant for it."""
        return f"_INBOX.{check_token(box_id, 'box id')}"

    # --- streams ---
    def stream_name(self, short: str) -> str:
        return f"{self._stream_prefix}_{short}"

    def streams(self) -> list[StreamDef]:
        p = self.prefix
        day = 86400.0
        return [
            StreamDef(
                self.stream_name("RUNS"),
                (f"{p}.runs.*.events", f"{p}.runs.*.control"),
                description="run lifecycle events and control commands",
            ),
            StreamDef(
                self.stream_name("METRICS"), (f"{p}.runs.*.metrics",), max_age_s=30 * day, description="metric batches"
            ),
            StreamDef(
                self.stream_name("LOGS"), (f"{p}.runs.*.logs",), max_age_s=30 * day, description="log line batches"
            ),
            StreamDef(
                self.stream_name("BOXES"),
                (f"{p}.boxes.*.heartbeat",),
                max_msgs_per_subject=1,
                max_age_s=7 * day,
                description="last heartbeat of each box",
            ),
            StreamDef(
                self.stream_name("WORK"),
                (f"{p}.provision.>", f"{p}.sync.>", f"{p}.deploy.>"),
                max_age_s=14 * day,
                description="requests between services",
            ),
            StreamDef(
                self.stream_name("FINDINGS"), (f"{p}.monitor.>",), max_age_s=90 * day, description="monitor findings"
            ),
        ]

    def stream_for(self, subject: str) -> str:
        """The stream that captures ``subject`` (raises ``KeyError`` when none does)."""
        for stream in self.streams():
            if any(subject_matches(pattern, subject) for pattern in stream.subjects):
                return stream.name
        raise KeyError(f"no stream captures subject {subject!r}")


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard match: ``*`` one token, ``>`` one or more trailing tokens."""
    pt, st = pattern.split("."), subject.split(".")
    for i, tok in enumerate(pt):
        if tok == ">":
            return len(st) > i
        if i >= len(st) or (tok != "*" and tok != st[i]):
            return False
    return len(pt) == len(st)
