"""A vast.ai emulator: the REST subset the ``vastai`` SDK and CLI use, instances as local boxes.

- ``Emulator``: the state (catalogue, instances, keys, faults, billing), usable directly.
- ``create_app(emulator, api_key)``: the FastAPI app (vast API + ``/admin``).
- ``EmulatorServer(emulator, api_key).start()``: serve it from a thread on a free port.
- ``python -m vast_emulator --port P --key K``: serve it as a process.

See docs/vast.md for the flags, the catalogue format, the fault API and what is covered.
"""

from __future__ import annotations

from .app import create_app
from .catalog import complete_offer, default_offers, load_catalog
from .core import ApiError, Emulator, Faults
from .server import EmulatorServer

__all__ = [
    "ApiError",
    "Emulator",
    "EmulatorServer",
    "Faults",
    "complete_offer",
    "create_app",
    "default_offers",
    "load_catalog",
]
