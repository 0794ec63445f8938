"""The bundle's errors."""

from __future__ import annotations

from choline_core.errors import UserError


class BundleError(UserError):
    """A bundle cannot be written, read or trusted: a card missing what it must say, bad preprocessing, an
    archive that would write outside its folder, files that do not match the card."""

    kind = "bundle_error"
