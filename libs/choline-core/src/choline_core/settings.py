"""Settings: one pydantic-settings class per process, ``CHOLINE_`` prefix.

Resolution order for every field (first wins):
1. the process environment (``CHOLINE_NATS_URL=...``),
2. ``$CHOLINE_HOME/endpoints.json`` and ``$CHOLINE_HOME/secrets/*.json``, written by
   ``choline up`` so that every client on the machine finds the embedded control plane,
3. the field's default.

Secrets are ``SecretStr``: they never print, and every one is registered for log redaction.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .logs import register_secret

ENDPOINTS_FILE = "endpoints.json"
SECRETS_DIR = "secrets"


def choline_home() -> Path:
    """Where all local state lives: ``$CHOLINE_HOME``, default ``~/.choline``."""
    return Path(os.environ.get("CHOLINE_HOME") or Path.home() / ".choline").expanduser()


def write_private(path: Path, data: str | bytes) -> None:
    """Write a file readable by its owner only (0600), atomically; parents made 0700."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_home_json(name: str) -> dict[str, Any]:
    """A JSON file under CHOLINE_HOME, or {} when it is absent or unreadable."""
    path = choline_home() / name
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class _HomeFilesSource(PydanticBaseSettingsSource):
    """Fields from endpoints.json and secrets/*.json under CHOLINE_HOME."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        merged: dict[str, Any] = dict(read_home_json(ENDPOINTS_FILE))
        secrets_dir = choline_home() / SECRETS_DIR
        if secrets_dir.is_dir():
            for path in sorted(secrets_dir.glob("*.json")):
                merged.update(read_home_json(f"{SECRETS_DIR}/{path.name}"))
        self._values = {k: v for k, v in merged.items() if k in settings_cls.model_fields}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


class CholineSettings(BaseSettings):
    """What every choline process needs to find the control plane."""

    model_config = SettingsConfigDict(env_prefix="CHOLINE_", extra="ignore", validate_default=True)

    home: Path = Field(default_factory=choline_home)
    nats_url: str = "nats://127.0.0.1:4322"
    nats_creds: Path | None = None
    nats_token: SecretStr | None = None
    subject_prefix: str = "choline"

    s3_endpoint: str = "http://127.0.0.1:8433"
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    s3_region: str = "us-east-1"
    s3_bucket: str = "choline"

    gateway_url: str = "http://127.0.0.1:8480"
    api_token: SecretStr | None = None  # the gateway's bearer token (``choline up`` writes an admin one)

    database_url: SecretStr | None = None
    log_level: str = "INFO"
    log_format: str = "human"
    installation_id: str = "default"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _HomeFilesSource(settings_cls))

    def model_post_init(self, __context: Any) -> None:
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                register_secret(value.get_secret_value())

    def path(self, *parts: str) -> Path:
        """A path under CHOLINE_HOME (not created)."""
        return self.home.joinpath(*parts)

    def secret(self, name: str) -> str | None:
        value = getattr(self, name)
        return value.get_secret_value() if isinstance(value, SecretStr) else value
