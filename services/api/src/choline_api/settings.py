"""The api service's settings (``CHOLINE_`` prefix, like every choline process)."""

from __future__ import annotations

from pydantic import SecretStr

from choline_core.settings import CholineSettings

PROVIDERS = ("local", "ssh", "vast")
TOKEN_FILE = "secrets/token.json"


class ApiSettings(CholineSettings):
    """
    - ``CHOLINE_ADMIN_TOKEN``: the admin token to create at the first start (a hosted control
      plane sets it; the embedded one lets the api generate it and write ``secrets/token.json``).
    - ``CHOLINE_API_RPC_TIMEOUT``: seconds to wait for the provisioner or syncer to answer.
    - ``CHOLINE_API_FOLLOW_GRACE``: seconds a log follower keeps reading after the run ended
      (the last lines can arrive just after the final state).
    - ``CHOLINE_API_MAX_BODY``: the largest request body accepted, in bytes.
    - ``CHOLINE_API_SECRET_KEY``: the gateway's key (32 bytes, base64url) that seals webhook
      secrets and signs stream tokens; default: created in ``secrets/api-key.json`` (0600).
      Replicas of a hosted gateway must share it.
    - ``CHOLINE_API_STREAM_TOKEN_TTL``: seconds a stream token (for ``EventSource``) stays valid.
    - ``CHOLINE_API_WEBHOOK_*``: delivery timeout, first retry delay (doubling each try, capped),
      tries before a delivery is failed, and whether private/loopback addresses may receive.
    """

    admin_token: SecretStr | None = None
    api_rpc_timeout: float = 5.0
    api_follow_grace: float = 1.5
    api_follow_poll: float = 1.0
    api_max_body: int = 1024 * 1024
    api_ingest_batch: int = 64  # messages per fetch = per transaction
    api_secret_key: SecretStr | None = None
    api_stream_token_ttl: float = 600.0
    api_webhook_timeout_s: float = 10.0
    api_webhook_backoff_s: float = 10.0
    api_webhook_backoff_max_s: float = 3600.0
    api_webhook_max_attempts: int = 12
    api_webhook_poll_s: float = 2.0
    api_webhook_allow_private: bool = True  # the embedded gateway runs on a laptop: loopback receivers are normal
