"""The deploy service's settings (``CHOLINE_`` prefix, like every process)."""

from __future__ import annotations

from pydantic import Field, SecretStr

from choline_core.settings import CholineSettings


class DeploySettings(CholineSettings):
    """How serving processes are run and watched.

    - ``CHOLINE_DEPLOY_READY_TIMEOUT_S``: how long a new replica has to answer ``/readyz`` (load + warm-up);
    - ``CHOLINE_DEPLOY_CHECK_INTERVAL_S``: how often every replica is checked (process alive, ``/readyz``);
    - ``CHOLINE_DEPLOY_UNHEALTHY_AFTER``: failed readiness checks in a row before a live replica is replaced;
    - ``CHOLINE_DEPLOY_SWITCH_GRACE_S``: after a switch (new version ready), how long the old replicas keep
      serving before they are told to drain (the gateway caches routes for about a second);
    - ``CHOLINE_DEPLOY_PYTHON``: the interpreter that runs ``python -m choline.serve`` (default: this one);
    - ``CHOLINE_DEPLOY_BOX_BIND``: the address a serving process on a rented box listens on (see ``boxes``);
    - ``CHOLINE_DEPLOY_BOX_READY_TIMEOUT_S``: how long a box replica may take (renting, bootstrap, load);
    - ``CHOLINE_DEPLOY_KEY``: the key box serving tokens are derived from (default: a file under secrets/).
    """

    deploy_ready_timeout_s: float = Field(180.0, gt=0)
    deploy_check_interval_s: float = Field(1.0, gt=0)
    deploy_unhealthy_after: int = Field(3, ge=1)
    deploy_switch_grace_s: float = Field(2.0, ge=0)
    deploy_python: str | None = None
    deploy_box_bind: str = "127.0.0.1"
    deploy_box_ready_timeout_s: float = Field(900.0, gt=0)
    deploy_key: SecretStr | None = None
