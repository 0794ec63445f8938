import io
import json
import logging
import stat
from pathlib import Path

import pytest

from choline_core.logs import configure_logging
from choline_core.settings import CholineSettings, write_private


def test_env_prefix_and_defaults(choline_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHOLINE_NATS_URL", "nats://127.0.0.1:9999")
    s = CholineSettings()
    assert s.home == choline_home
    assert s.nats_url == "nats://127.0.0.1:9999"
    assert s.subject_prefix == "choline"


def test_home_files_fill_in_and_env_wins(choline_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (choline_home / "endpoints.json").write_text(
        json.dumps({"nats_url": "nats://127.0.0.1:1111", "s3_endpoint": "http://127.0.0.1:2222"})
    )
    write_private(
        choline_home / "secrets" / "s3.json", json.dumps({"s3_access_key": "AK", "s3_secret_key": "sekrit-123"})
    )
    s = CholineSettings()
    assert s.nats_url == "nats://127.0.0.1:1111" and s.s3_endpoint == "http://127.0.0.1:2222"
    assert s.secret("s3_secret_key") == "sekrit-123"
    monkeypatch.setenv("CHOLINE_NATS_URL", "nats://127.0.0.1:3333")
    assert CholineSettings().nats_url == "nats://127.0.0.1:3333"
    mode = stat.S_IMODE((choline_home / "secrets" / "s3.json").stat().st_mode)
    assert mode == 0o600


def test_secrets_never_print_or_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHOLINE_S3_SECRET_KEY", "very-secret-value-42")
    s = CholineSettings()
    assert "very-secret-value-42" not in repr(s) and "very-secret-value-42" not in str(s.model_dump())
    buf = io.StringIO()
    configure_logging("INFO", "json", service="t", stream=buf)
    logging.getLogger("t").info("connecting with %s", s.secret("s3_secret_key"))
    out = buf.getvalue()
    assert "very-secret-value-42" not in out and "***" in out
    assert json.loads(out.splitlines()[-1])["service"] == "t"
    configure_logging("INFO", "human")
