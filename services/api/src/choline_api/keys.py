"""The gateway's own key: webhook secrets and URLs encrypted at rest, stream tokens signed.

One 256-bit master key per installation, from ``CHOLINE_API_SECRET_KEY`` (a hosted control plane
with several replicas sets the same value on each), else ``$CHOLINE_HOME/secrets/api-key.json``
(0600), created at the first start. It never goes to the database, a log line or an event. Two
keys are derived from it (HMAC-SHA256 with a label), so one use can never stand in for the other:

- ``SecretBox``: AES-256-GCM, a fresh 96-bit nonce per value, the row's id as associated data (a
  ciphertext moved onto another row does not decrypt). Stored as ``v1.<base64url(nonce+ct)>``.
- ``StreamTokens``: short-lived, run-scoped tokens for ``EventSource``, which cannot send an
  ``Authorization`` header: ``st1.<base64url(payload)>.<base64url(hmac)>``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from choline_core.errors import Bug, Unauthorized
from choline_core.logs import register_secret
from choline_core.settings import write_private

log = logging.getLogger(__name__)

KEY_FILE = "secrets/api-key.json"
KEY_FIELD = "api_secret_key"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_or_create_master_key(configured: str | None, home: Path) -> bytes:
    """The master key: the configured one, else the one in ``secrets/api-key.json`` (created
    0600 at the first start; two replicas starting together agree, the file is created once)."""
    if configured:
        key = _decode_key(configured)
        if key is None:
            raise Bug(
                "CHOLINE_API_SECRET_KEY must be 32 bytes, base64url (python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))')"
            )
        return key
    path = home / KEY_FILE
    if not path.exists():
        fresh = _b64(secrets.token_bytes(32))
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.new{os.getpid()}")
        write_private(tmp, json.dumps({KEY_FIELD: fresh}))
        try:
            os.link(tmp, path)  # atomic create-if-absent: a racing replica keeps the first key
            log.info("created the gateway's key in %s (0600)", path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    try:
        value = json.loads(path.read_text())[KEY_FIELD]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise Bug(f"cannot read the gateway's key from {path}: {exc}") from exc
    key = _decode_key(str(value))
    if key is None:
        raise Bug(f"the gateway's key in {path} is not 32 bytes of base64url")
    return key


def _decode_key(text: str) -> bytes | None:
    register_secret(text)
    try:
        key = _unb64(text.strip())
    except (ValueError, TypeError):
        return None
    return key if len(key) == 32 else None


def derive(master: bytes, label: str) -> bytes:
    return hmac.new(master, label.encode(), hashlib.sha256).digest()


class SecretBox:
    """Encrypt short secrets for the database (AES-256-GCM, the row id as associated data)."""

    PREFIX = "v1."

    def __init__(self, master: bytes) -> None:
        self._aead = AESGCM(derive(master, "choline-api/secret-box/v1"))

    def seal(self, plaintext: str, row_id: str) -> str:
        nonce = secrets.token_bytes(12)
        return self.PREFIX + _b64(nonce + self._aead.encrypt(nonce, plaintext.encode(), row_id.encode()))

    def open(self, sealed: str, row_id: str) -> str:
        if not sealed.startswith(self.PREFIX):
            raise ValueError("not a sealed value")
        raw = _unb64(sealed[len(self.PREFIX) :])
        try:
            return self._aead.decrypt(raw[:12], raw[12:], row_id.encode()).decode()
        except InvalidTag as exc:
            raise ValueError("the value does not decrypt with this gateway's key") from exc


@dataclass(frozen=True)
class StreamClaim:
    user: str
    token_id: str
    run_id: str
    expires_at: float


class StreamTokens:
    """``st1.<payload>.<mac>``: who (user, the bearer token's id), which run, until when.

    Verification checks the MAC and the expiry; the caller also checks that the bearer token it
    was made from is still active, so revoking a token ends its stream tokens too."""

    PREFIX = "st1."

    def __init__(self, master: bytes) -> None:
        self._key = derive(master, "choline-api/stream-token/v1")

    def issue(self, user: str, token_id: str, run_id: str, ttl_s: float) -> tuple[str, float]:
        exp = time.time() + ttl_s
        payload = _b64(
            json.dumps({"u": user, "t": token_id, "r": run_id, "e": int(exp)}, separators=(",", ":")).encode()
        )
        mac = _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())
        return f"{self.PREFIX}{payload}.{mac}", float(int(exp))

    def verify(self, token: str, run_id: str) -> StreamClaim:
        bad = Unauthorized("the stream token is not valid", hint="ask for a new one: POST /v1/runs/{id}/stream-token")
        if not token.startswith(self.PREFIX) or token.count(".") != 2:
            raise bad
        payload, mac = token[len(self.PREFIX) :].split(".")
        want = _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())
        if not hmac.compare_digest(want, mac):
            raise bad
        try:
            data = json.loads(_unb64(payload))
            claim = StreamClaim(str(data["u"]), str(data["t"]), str(data["r"]), float(data["e"]))
        except (ValueError, KeyError, TypeError):
            raise bad from None
        if claim.expires_at < time.time():
            raise Unauthorized(
                "the stream token has expired", hint="ask for a new one: POST /v1/runs/{id}/stream-token"
            )
        if claim.run_id != run_id:
            raise bad
        return claim
