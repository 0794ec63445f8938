"""The digits network, in a file of its own so that a model bundle can carry it (``code/model.py``) and a
serving process can rebuild it without the training script."""

from __future__ import annotations

from torch import nn


def build(hidden: int = 128, dropout: float = 0.1) -> nn.Module:
    """64 pixel values in, 10 logits (digits 0-9) out."""
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
