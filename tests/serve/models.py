"""Small models for the serving tests, in a file of their own so a bundle can carry their code."""

from __future__ import annotations

import time

import torch
from torch import nn


class Slow(nn.Module):
    """``x * w`` after sleeping ``delay`` seconds per forward pass: room to queue, time out and drain."""

    def __init__(self, delay: float = 0.2, width: int = 4) -> None:
        super().__init__()
        self.delay = delay
        self.w = nn.Parameter(torch.arange(1, width + 1, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        return x * self.w


class Mixed(nn.Module):
    """Three inputs of other dtypes and a varying length: tokens (int64 [*]), mask (bool [*]), image
    (uint8 [2, 3]). Gives ``[sum of the kept tokens, sum of the image]`` and raises on a token of 13."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        if bool((tokens == 13).any()):
            raise RuntimeError("unlucky token")
        kept = (tokens * mask).sum(dim=1).float()
        pixels = image.float().sum(dim=(1, 2))
        return torch.stack([kept, pixels], dim=1) * self.scale
