"""One exception tree for the whole of choline.

Domain code raises these; the edges (HTTP routers, the CLI, bus handlers) map them once:
``http_status`` for the gateway, ``exit_code`` for the CLI, and ``hint`` as the fix shown
after the one-line message. Retry meaning travels in the type: a handler that catches
``Retryable`` may try again later; anything else is final.
"""

from __future__ import annotations

from typing import Any


class CholineError(Exception):
    """Base of every error choline raises on purpose."""

    http_status = 500
    exit_code = 1
    kind = "error"

    def __init__(self, message: str, *, hint: str | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.detail = detail

    def one_line(self) -> str:
        """The message as the CLI prints it: one line, with the fix where there is one."""
        text = " ".join(self.message.split())
        if self.hint:
            text += f" ({' '.join(self.hint.split())})"
        return text

    def to_body(self) -> dict[str, Any]:
        """The shared HTTP error body: type, message, detail."""
        return {"type": self.kind, "message": self.one_line(), "detail": self.detail}


# --- the user's mistakes: fixable by the user, never retried -------------------------------
class UserError(CholineError):
    http_status = 400
    kind = "user_error"


class BadUsage(UserError):
    """Wrong arguments on the command line (CLI exit code 2)."""

    exit_code = 2
    kind = "bad_usage"


class BadSpec(UserError):
    kind = "bad_spec"


class NotFound(UserError):
    http_status = 404
    kind = "not_found"


class Conflict(UserError):
    http_status = 409
    kind = "conflict"


class Unauthorized(UserError):
    http_status = 401
    kind = "unauthorized"


class Forbidden(UserError):
    http_status = 403
    kind = "forbidden"


# --- the world's failures: infrastructure, providers, storage --------------------------------
class InfraError(CholineError):
    http_status = 502
    kind = "infra_error"


class Retryable(InfraError):
    """A failure that may go away: try again later (maybe elsewhere)."""

    http_status = 503
    kind = "retryable"


class ProviderError(InfraError):
    kind = "provider_error"


class NoCapacity(ProviderError, Retryable):
    """No offer matches, or the offer vanished before it could be rented."""

    kind = "no_capacity"


class ProvisioningFailed(ProviderError):
    """The provider tried and failed to create the instance; take another offer."""

    kind = "provisioning_failed"


class NotYetReady(ProviderError, Retryable):
    """The instance exists but is not usable yet; ask again shortly."""

    kind = "not_yet_ready"


class StorageError(InfraError):
    kind = "storage_error"


class ObjectNotFound(StorageError, NotFound):
    """A key that is not in the object store."""

    http_status = 404
    kind = "object_not_found"


class BusError(Retryable):
    kind = "bus_error"


class ControlPlaneDown(InfraError):
    kind = "control_plane_down"


# --- our own mistakes ------------------------------------------------------------------------
class Bug(CholineError):
    """An invariant choline itself broke. Reported with a request to file an issue."""

    kind = "bug"
