"""The syncer's settings (``CHOLINE_`` prefix, like every process)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from choline_core.settings import CholineSettings


class SyncerSettings(CholineSettings):
    """Retention and presigning.

    - ``CHOLINE_SYNCER_KEEP``: complete checkpoints kept per run (the newest by step), default 3;
    - ``CHOLINE_SYNCER_BEST_METRIC`` / ``CHOLINE_SYNCER_BEST_MODE``: one more is kept, the best by this
      metric of the checkpoint's manifest (default the lowest ``val_loss``; empty to disable);
    - ``CHOLINE_SYNCER_URL_TTL_S``: how long presigned URLs stay valid;
    - ``CHOLINE_SYNCER_VERIFY_PACKS``: read every uploaded dataset pack back and check each chunk's sha256
      before indexing it (default on; off checks only the pack's index and trusts readers to catch damage);
    - ``CHOLINE_S3_PUBLIC_ENDPOINT``: the S3 endpoint the gateway's clients (CLI, browser) reach, when it is
      not ``CHOLINE_S3_ENDPOINT``. Boxes get URLs for the endpoint their ``BoxEndpoints`` event names.
    """

    syncer_keep: int = Field(3, ge=1)
    syncer_best_metric: str = "val_loss"
    syncer_best_mode: Literal["min", "max"] = "min"
    syncer_url_ttl_s: int = Field(4 * 3600, ge=60, le=7 * 24 * 3600)
    syncer_verify_packs: bool = True
    s3_public_endpoint: str | None = None
