"""Datasets that move fast: content-defined chunks in packfiles, deduplicated and resumable in both directions.

- ``tree``: what a folder holds (files, links, empty folders), refusing what would escape it;
- ``chunking``: FastCDC cut points (``pyfastcdc``) and each chunk's sha256;
- ``packs``: ~16 MiB packfiles (chunk bytes, a JSON index, a footer);
- ``push``: scan, chunk, ask which chunks are stored, pack and upload the rest, commit the manifest;
- ``fetch``: materialise a manifest into a folder with parallel ranged GETs, every chunk checked, each file
  renamed into place when complete, resumable after a kill; chunks already on disk are copied, not fetched;
- ``remote``: the gateway's ``/v1/datasets`` calls; ``state``: this machine's caches (``$CHOLINE_HOME/datasets``);
- ``data(name)``: where a dataset lives for a script (the synced folder on a box, the local folder here).

The formats are contracts in ``choline_core.pipeline`` (``DatasetManifest``, pack footer and index).
"""

from __future__ import annotations

from .paths import data

__all__ = ["data"]
