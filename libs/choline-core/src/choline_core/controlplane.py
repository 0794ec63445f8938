"""Where the embedded control plane lives under ``CHOLINE_HOME``, and how clients find it.

``choline up`` chooses ports at the first start (free ones, or those set in the environment),
records them in ``controlplane.json`` and reuses them afterwards, so every client (CLI,
services, agents on local boxes, tests) finds the same endpoints in ``endpoints.json``. S3
credentials are generated once and kept in ``secrets/s3.json`` (0600).

Layout::

    $CHOLINE_HOME/
      controlplane.json      ports chosen at first ``up`` (nats, nats_monitor, s3 roles, services)
      endpoints.json         nats_url, s3_endpoint, gateway_url (read by CholineSettings)
      secrets/s3.json        s3_access_key, s3_secret_key (0600)
      run/supervisor.lock    held (flock) by the running supervisor
      run/state.json         live state written by the supervisor
      logs/<component>.log   each component's output
      nats/  s3/  db/        data: JetStream store, S3 objects, one SQLite file per service
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .embedded import GRPC_OFFSET, free_weed_port, port_free, stable_port
from .errors import InfraError
from .settings import ENDPOINTS_FILE, SECRETS_DIR, choline_home, write_private

SERVICES = ("api", "provisioner", "syncer", "monitor", "deploy")
CONFIG_FILE = "controlplane.json"
STATE_FILE = "run/state.json"
LOCK_FILE = "run/supervisor.lock"
S3_ROLES = ("s3", "master", "volume", "filer", "admin")
# Environment overrides for the ports people care about (the rest are internal).
PORT_ENV = {"nats": "CHOLINE_NATS_PORT", "s3": "CHOLINE_S3_PORT", "api": "CHOLINE_GATEWAY_PORT"}


@dataclass
class ControlPlaneConfig:
    home: Path
    ports: dict[str, int] = field(default_factory=dict)
    s3_ports: dict[str, int] = field(default_factory=dict)
    bucket: str = "choline"

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.ports['nats']}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_ports['s3']}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    def service_port(self, service: str) -> int:
        return self.ports[service]

    def path(self, *parts: str) -> Path:
        return self.home.joinpath(*parts)

    # ------------------------------------------------------------------ persistence
    @classmethod
    def load_or_create(cls, home: Path | None = None) -> ControlPlaneConfig:
        """Read the recorded ports, or choose and record them (first ``up``)."""
        home = home or choline_home()
        path = home / CONFIG_FILE
        if path.exists():
            data = json.loads(path.read_text())
            cfg = cls(
                home=home,
                ports={k: int(v) for k, v in data["ports"].items()},
                s3_ports={k: int(v) for k, v in data["s3_ports"].items()},
                bucket=data.get("bucket", "choline"),
            )
            changed = False
        else:
            cfg = cls(home=home)
            changed = True
        changed |= cfg._apply_env_overrides()
        changed |= cfg._fill_missing()
        if changed:
            cfg.save()
        cfg.ensure_credentials()
        cfg.ensure_nats_credentials()
        cfg.write_endpoints()
        return cfg

    @classmethod
    def load(cls, home: Path | None = None) -> ControlPlaneConfig | None:
        home = home or choline_home()
        path = home / CONFIG_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return cls(
            home=home,
            ports={k: int(v) for k, v in data["ports"].items()},
            s3_ports={k: int(v) for k, v in data["s3_ports"].items()},
            bucket=data.get("bucket", "choline"),
        )

    def _apply_env_overrides(self) -> bool:
        changed = False
        for name, var in PORT_ENV.items():
            raw = os.environ.get(var)
            if not raw:
                continue
            try:
                port = int(raw)
            except ValueError as exc:
                raise InfraError(f"{var}={raw!r} is not a port number") from exc
            target = self.s3_ports if name == "s3" else self.ports
            if target.get(name) != port:
                target[name] = port
                changed = True
        return changed

    def _fill_missing(self) -> bool:
        changed = False
        taken = set(self.ports.values()) | set(self.s3_ports.values())
        taken |= {p + GRPC_OFFSET for p in self.s3_ports.values()}
        for name in ("nats", "nats_monitor", *SERVICES):
            if name not in self.ports:
                p = stable_port(taken)  # recorded and reused at every `up`: never an ephemeral port
                self.ports[name] = p
                taken.add(p)
                changed = True
        for role in S3_ROLES:
            if role not in self.s3_ports:
                p = free_weed_port(taken)
                self.s3_ports[role] = p
                taken |= {p, p + GRPC_OFFSET}
                changed = True
        return changed

    def save(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        data = {"ports": self.ports, "s3_ports": self.s3_ports, "bucket": self.bucket}
        (self.home / CONFIG_FILE).write_text(json.dumps(data, indent=1, sort_keys=True))

    def ensure_credentials(self) -> dict[str, str]:
        path = self.home / SECRETS_DIR / "s3.json"
        if path.exists():
            return dict(json.loads(path.read_text()))
        creds = {"s3_access_key": f"choline-{secrets.token_hex(6)}", "s3_secret_key": secrets.token_urlsafe(30)}
        write_private(path, json.dumps(creds))
        return creds

    def ensure_nats_credentials(self) -> Path:
        """NATS runs in operator/JWT mode: the control plane's processes share one service user
        (``secrets/nats-service.creds``), found by every client through ``secrets/nats.json``."""
        from .natsauth import NatsAuth

        secrets_dir = self.home / SECRETS_DIR
        creds = secrets_dir / "nats-service.creds"
        auth = NatsAuth.load_or_create(secrets_dir)
        if not creds.exists():
            write_private(creds, auth.service_creds())
        pointer = secrets_dir / "nats.json"
        if not pointer.exists():
            write_private(pointer, json.dumps({"nats_creds": str(creds)}))
        return creds

    def write_endpoints(self) -> None:
        data = {
            "nats_url": self.nats_url,
            "s3_endpoint": self.s3_endpoint,
            "gateway_url": self.gateway_url,
            "s3_bucket": self.bucket,
        }
        (self.home / ENDPOINTS_FILE).write_text(json.dumps(data, indent=1, sort_keys=True))

    def check_ports_free(self) -> None:
        """Raise a clear error naming the first recorded port something else holds."""
        for name, port in sorted(self.ports.items()):
            if not port_free(port):
                var = PORT_ENV.get(name)
                fix = f"set {var} to a free port" if var else f"edit {self.home / CONFIG_FILE}"
                raise InfraError(
                    f"port {port} for {name} on 127.0.0.1 is taken by another process",
                    hint=f"stop what uses it or {fix}",
                )
        for role, port in sorted(self.s3_ports.items()):
            for p in (port, port + GRPC_OFFSET):
                if not port_free(p):
                    fix = "set CHOLINE_S3_PORT to a free port" if role == "s3" else f"edit {self.home / CONFIG_FILE}"
                    raise InfraError(
                        f"port {p} for the S3 server's {role} on 127.0.0.1 is taken by another process",
                        hint=f"stop what uses it or {fix}",
                    )


def read_state(home: Path | None = None) -> dict[str, Any] | None:
    path = (home or choline_home()) / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
