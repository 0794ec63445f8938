"""Logging for every choline process: one ``configure_logging()``.

Human format for terminals, JSON lines for services (``CHOLINE_LOG_FORMAT=json``). Handler
log lines carry ``subject``, ``run_id`` and ``msg_id`` when passed through ``extra=``.

Secrets: every ``SecretStr`` a settings object holds is registered with
``register_secret()`` and replaced by ``***`` in any record that would print it, so a
careless ``log.info("%s", url_with_key)`` still leaks nothing.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Any

_SECRETS: set[str] = set()
_SECRETS_LOCK = threading.Lock()
_CONTEXT_FIELDS = ("service", "subject", "run_id", "box_id", "msg_id", "attempt")


def register_secret(value: str | None) -> None:
    """Redact this value from every log record from now on (values under 6 chars are ignored)."""
    if value and len(value) >= 6:
        with _SECRETS_LOCK:
            _SECRETS.add(value)


def redact(text: str) -> str:
    if not _SECRETS:
        return text
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "***")
    return text


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _SECRETS:
            msg = record.getMessage()
            clean = redact(msg)
            if clean != msg:
                record.msg, record.args = clean, None
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str | None = None) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.service:
            out["service"] = self.service
        for key in _CONTEXT_FIELDS:
            val = getattr(record, key, None)
            if val is not None:
                out[key] = val
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(out, default=str))


class HumanFormatter(logging.Formatter):
    def __init__(self, service: str | None = None) -> None:
        prefix = f"[{service}] " if service else ""
        super().__init__(f"%(asctime)s {prefix}%(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ctx = [f"{k}={getattr(record, k)}" for k in _CONTEXT_FIELDS[1:] if getattr(record, k, None)]
        if ctx:
            text += "  " + " ".join(ctx)
        return redact(text)


def configure_logging(
    level: str | int | None = None,
    fmt: str | None = None,
    service: str | None = None,
    stream: Any = None,
) -> None:
    """Install one handler on the root logger. Safe to call twice (the second call replaces)."""
    level = level or os.environ.get("CHOLINE_LOG_LEVEL", "INFO")
    fmt = fmt or os.environ.get("CHOLINE_LOG_FORMAT", "human")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else HumanFormatter(service))
    handler.addFilter(_RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_choline", False):
            root.removeHandler(old)
    handler._choline = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    # Chatty libraries stay at WARNING unless asked for.
    for noisy in ("asyncio", "urllib3", "httpx", "httpcore", "asyncssh", "nats", "botocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
