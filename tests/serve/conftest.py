"""Bundles for the serving tests (built once per session) and an in-process server on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits network (examples/digits/model.py) with seeded weights, its normalization, its labels."""
    import torch

    import choline
    from choline.bundle import Input, Output, normalize

    sys.path.insert(0, str(ROOT / "examples" / "digits"))
    try:
        from model import build
    finally:
        sys.path.remove(str(ROOT / "examples" / "digits"))
    torch.manual_seed(0)
    mean = [float(i % 7) for i in range(64)]
    std = [1.0 + (i % 5) for i in range(64)]
    b = choline.save_bundle(
        build(128, 0.1),
        tmp_path_factory.mktemp("bundles") / "digits",
        card={
            "name": "digits",
            "purpose": "Recognise a handwritten digit (0-9) in an 8x8 grayscale image.",
            "inputs": [Input("pixels", "float32", [64], range=(0, 16))],
            "outputs": [Output("digit", kind="logits", shape=[10], labels=[str(i) for i in range(10)])],
        },
        factory=build,
        kwargs={"hidden": 128, "dropout": 0.1},
        preprocessing=[normalize(mean, std)],
    )
    assert b.tarball is not None
    return b.tarball


@pytest.fixture(scope="session")
def slow_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import choline
    from choline.bundle import Input, Output

    from .models import Slow

    b = choline.save_bundle(
        Slow(0.2),
        tmp_path_factory.mktemp("bundles") / "slow",
        card={
            "purpose": "Multiply by 1, 2, 3, 4, slowly.",
            "inputs": [Input("x", "float32", [4])],
            "outputs": [Output("y", kind="values", shape=[4])],
        },
        kwargs={"delay": 0.2, "width": 4},
    )
    assert b.tarball is not None
    return b.tarball


@pytest.fixture(scope="session")
def mixed_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    import choline
    from choline.bundle import Input, Output

    from .models import Mixed

    b = choline.save_bundle(
        Mixed(),
        tmp_path_factory.mktemp("bundles") / "mixed",
        card={
            "purpose": "Sum kept tokens and pixels.",
            "inputs": [
                Input("tokens", "int64", [None], range=(0, 99)),
                Input("mask", "bool", [None]),
                Input("image", "uint8", [2, 3]),
            ],
            "outputs": [Output("summary", kind="values", shape=[2])],
        },
        example=[
            torch.ones(2, 5, dtype=torch.int64),
            torch.ones(2, 5, dtype=torch.bool),
            torch.ones(2, 2, 3, dtype=torch.uint8),
        ],
    )
    assert b.tarball is not None
    return b.tarball


@contextlib.asynccontextmanager
async def serving(bundle: Path | Any, **config: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The bundle served by ``choline.serve`` in this event loop on a free port; an HTTP client for it."""
    import choline
    from choline.serve.app import ServeConfig, ServingApp
    from choline.serve.server import listen, serve

    loaded = choline.load_bundle(bundle) if isinstance(bundle, Path) else bundle
    app = ServingApp(loaded, ServeConfig(**config))
    app.warmup()
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    task = asyncio.create_task(serve(app, sock=sock, announce=False))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        for _ in range(500):
            if app.ready and getattr(app, "server", None) is not None and app.server.started:
                break
            await asyncio.sleep(0.01)
        client.app = app  # type: ignore[attr-defined]
        try:
            yield client
        finally:
            app.server.should_exit = True
            await asyncio.wait_for(task, 30)
