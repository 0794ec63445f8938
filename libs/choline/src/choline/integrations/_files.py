"""A framework's checkpoint (a file or a folder) inside a choline checkpoint, and back, byte for byte.

Each file becomes a ``uint8`` tensor under ``{"files": {relative path: bytes}}``; choline writes it into its
safetensors files (nothing of it is unpickled by choline) and restores it exactly. The framework then loads
its own files as it always does.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from choline_core.errors import UserError


def pack_files(root: Path, names: list[str] | None = None) -> dict[str, Any]:
    """``{"files": {path: uint8 tensor}}`` for a file (its name) or every file under a folder."""
    files: dict[str, torch.Tensor] = {}
    if root.is_file():
        files[root.name] = torch.frombuffer(bytearray(root.read_bytes()), dtype=torch.uint8)
    else:
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.is_symlink():
                rel = p.relative_to(root).as_posix()
                if names is None or rel in names:
                    files[rel] = torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)
    return {"files": files}


def unpack_files(state: dict[str, Any], dest: Path) -> list[Path]:
    """Write what ``pack_files`` captured under ``dest``; returns the files written."""
    out = []
    for rel, data in (state.get("files") or {}).items():
        parts = PurePosixPath(rel).parts
        if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
            raise UserError(f"a checkpoint file name {rel!r} would leave {dest}")
        target = dest.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part{os.getpid()}")
        tensor = data if isinstance(data, torch.Tensor) else torch.as_tensor(data, dtype=torch.uint8)
        tmp.write_bytes(tensor.contiguous().numpy().tobytes())
        os.replace(tmp, target)
        out.append(target)
    return out
