"""The provisioner's settings (``CHOLINE_`` prefix, on top of the shared ones)."""

from __future__ import annotations

from pydantic import SecretStr

from choline_core.settings import CholineSettings


class ProvisionerSettings(CholineSettings):
    #: a box silent this long is a suspect (lost only when the provider or an SSH probe confirms)
    loss_timeout_s: float = 60.0
    #: the same for boxes on this machine (the local provider): no network in between
    local_loss_timeout_s: float = 10.0
    probe_timeout_s: float = 10.0
    #: how long an instance may stay ``loading`` before it is destroyed and the next offer taken
    boot_timeout_s: float = 600.0
    bootstrap_timeout_s: float = 300.0
    #: direct mode: what boxes use to reach NATS and S3 (no tunnels when set)
    public_nats_url: str | None = None
    public_s3_endpoint: str | None = None
    reaper_interval_s: float = 60.0
    watch_interval_s: float = 1.0
    lease_s: float = 30.0
    #: offers tried per attempt before the run fails for lack of capacity
    max_offers_per_attempt: int = 5
    local_base_python: str | None = None
    vast_api_key: SecretStr | None = None
    vast_url: str | None = None
    #: a box's NATS credentials expire after this; the provisioner renews them at half-life
    box_creds_ttl_s: float = 24 * 3600.0
    #: fault barriers handed to every agent this provisioner starts (chaos tests only)
    agent_faults: str | None = None
    #: agent flags passed on (tests shorten heartbeats)
    heartbeat_s: float = 5.0
