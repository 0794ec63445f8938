"""NATS in operator/JWT mode: the control plane's identities and per-box credentials.

A rented p2p machine is untrusted. Each box gets a user JWT of its own, signed by the
installation's account key, that may only

- publish its run's subjects (``<p>.runs.<run>.{events,logs,metrics,req.>}``) and its heartbeat,
- subscribe to its run's control subject and to its own inbox prefix (``_INBOX.<box>.>``),
- and nothing of ``$JS.API.>``: the control plane creates every consumer,

and expires (``ttl``). Services get an unrestricted user of the same account.

``NatsAuth.load_or_create(dir)`` keeps the operator, system and account seeds in one file
(0600) and writes the server's config include: ``operator``, ``system_account``, and a
``MEMORY`` resolver preloaded with both accounts. JWTs are minted here (ed25519 via ``nkeys``):
header ``{"typ":"JWT","alg":"ed25519-nkey"}``, claims with ``jti`` = base32(sha512/256 of the
claims), signature over ``header.claims``, all base64url without padding, as nats-io/jwt v2.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys

from .settings import write_private

HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
UNLIMITED = -1


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_seed(prefix: int) -> bytes:
    return bytes(nkeys.encode_seed(os.urandom(32), prefix))


@dataclass(frozen=True)
class Identity:
    seed: bytes

    @property
    def keypair(self) -> Any:
        return nkeys.from_seed(self.seed)

    @property
    def public(self) -> str:
        return str(self.keypair.public_key.decode())


def encode_jwt(claims: dict[str, Any], signer: Identity) -> str:
    """Sign ``claims`` (``iss`` is set to the signer; ``jti`` and ``iat`` are filled in)."""
    body = dict(claims)
    body["iss"] = signer.public
    body.setdefault("iat", int(time.time()))
    body.pop("jti", None)
    digest = hashlib.new("sha512_256", json.dumps(body, separators=(",", ":")).encode()).digest()
    body["jti"] = base64.b32encode(digest).decode().rstrip("=")
    head = _b64(json.dumps(HEADER, separators=(",", ":")).encode())
    payload = _b64(json.dumps(body, separators=(",", ":")).encode())
    signature = signer.keypair.sign(f"{head}.{payload}".encode())
    return f"{head}.{payload}.{_b64(bytes(signature))}"


def decode_jwt(token: str) -> dict[str, Any]:
    """The claims of a JWT (no verification: for reading what we minted)."""
    return dict(json.loads(_unb64(token.split(".")[1])))


def operator_jwt(operator: Identity, system_account: str, name: str = "choline") -> str:
    return encode_jwt(
        {
            "sub": operator.public,
            "name": name,
            "nats": {"system_account": system_account, "type": "operator", "version": 2},
        },
        operator,
    )


def account_jwt(account: Identity, operator: Identity, name: str, *, jetstream: bool) -> str:
    limits: dict[str, Any] = {
        "subs": UNLIMITED,
        "data": UNLIMITED,
        "payload": UNLIMITED,
        "imports": UNLIMITED,
        "exports": UNLIMITED,
        "wildcards": True,
        "conn": UNLIMITED,
        "leaf": UNLIMITED,
    }
    if jetstream:
        limits.update(
            {"mem_storage": UNLIMITED, "disk_storage": UNLIMITED, "streams": UNLIMITED, "consumer": UNLIMITED}
        )
    return encode_jwt(
        {
            "sub": account.public,
            "name": name,
            "nats": {"limits": limits, "default_permissions": {"pub": {}, "sub": {}}, "type": "account", "version": 2},
        },
        operator,
    )


def user_jwt(
    user: Identity,
    account: Identity,
    name: str,
    *,
    pub_allow: list[str] | None = None,
    sub_allow: list[str] | None = None,
    ttl_s: float | None = None,
    allow_responses: bool = False,
) -> str:
    """A user of ``account``. ``None`` permissions mean unrestricted; lists are allow-lists."""
    nats: dict[str, Any] = {"subs": UNLIMITED, "data": UNLIMITED, "payload": UNLIMITED, "type": "user", "version": 2}
    if pub_allow is not None:
        nats["pub"] = {"allow": pub_allow}
    if sub_allow is not None:
        nats["sub"] = {"allow": sub_allow}
    if allow_responses:
        nats["resp"] = {"max": 1, "ttl": 0}
    claims: dict[str, Any] = {"sub": user.public, "name": name, "nats": nats}
    if ttl_s:
        claims["exp"] = int(time.time() + ttl_s)
    return encode_jwt(claims, account)


def creds_text(jwt: str, seed: bytes) -> str:
    """A ``.creds`` file as nats-server's tools write it (what ``user_credentials=`` reads)."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed.decode()}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


def box_permissions(prefix: str, run_id: str, box_id: str) -> tuple[list[str], list[str]]:
    """(publish, subscribe) allow-lists of a box running one attempt of ``run_id``."""
    run = f"{prefix}.runs.{run_id}"
    publish = [f"{run}.events", f"{run}.logs", f"{run}.metrics", f"{run}.req.>", f"{prefix}.boxes.{box_id}.heartbeat"]
    subscribe = [f"{run}.control", f"_INBOX.{box_id}.>"]
    return publish, subscribe


@dataclass
class NatsAuth:
    """The installation's operator, system account and application account."""

    operator: Identity
    system: Identity
    account: Identity

    FILE = "nats-auth.json"

    @classmethod
    def load_or_create(cls, secrets_dir: Path) -> NatsAuth:
        path = secrets_dir / cls.FILE
        if path.exists():
            data = json.loads(path.read_text())
            return cls(
                Identity(data["operator"].encode()),
                Identity(data["system"].encode()),
                Identity(data["account"].encode()),
            )
        auth = cls(
            Identity(new_seed(nkeys.PREFIX_BYTE_OPERATOR)),
            Identity(new_seed(nkeys.PREFIX_BYTE_ACCOUNT)),
            Identity(new_seed(nkeys.PREFIX_BYTE_ACCOUNT)),
        )
        write_private(
            path,
            json.dumps(
                {
                    "operator": auth.operator.seed.decode(),
                    "system": auth.system.seed.decode(),
                    "account": auth.account.seed.decode(),
                }
            ),
        )
        return auth

    @classmethod
    def load(cls, secrets_dir: Path) -> NatsAuth | None:
        return cls.load_or_create(secrets_dir) if (secrets_dir / cls.FILE).exists() else None

    def server_config(self) -> str:
        """The nats-server config for operator mode (include it, or pass it with ``-c``)."""
        op = operator_jwt(self.operator, self.system.public)
        sys_jwt = account_jwt(self.system, self.operator, "SYS", jetstream=False)
        acc_jwt = account_jwt(self.account, self.operator, "CHOLINE", jetstream=True)
        return (
            f'operator: "{op}"\n'
            f"system_account: {self.system.public}\n"
            "resolver: MEMORY\n"
            "resolver_preload: {\n"
            f'  {self.system.public}: "{sys_jwt}"\n'
            f'  {self.account.public}: "{acc_jwt}"\n'
            "}\n"
        )

    def service_creds(self, name: str = "services") -> str:
        """Credentials for control-plane processes: unrestricted within the account."""
        user = Identity(new_seed(nkeys.PREFIX_BYTE_USER))
        return creds_text(user_jwt(user, self.account, name), user.seed)

    def box_creds(self, prefix: str, run_id: str, box_id: str, *, ttl_s: float) -> str:
        """Credentials for one box: its run's subjects only, expiring after ``ttl_s``."""
        publish, subscribe = box_permissions(prefix, run_id, box_id)
        user = Identity(new_seed(nkeys.PREFIX_BYTE_USER))
        jwt = user_jwt(user, self.account, f"box-{box_id}", pub_allow=publish, sub_allow=subscribe, ttl_s=ttl_s)
        return creds_text(jwt, user.seed)
