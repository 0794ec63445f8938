"""The ~10M-parameter CNN of bench/serve: 32x32 RGB images, 10 classes, in the VGG manner: a strided
convolutional trunk that brings the image down to 4x4, then a wide fully connected head."""

from __future__ import annotations

from torch import nn


def block(cin: int, cout: int, stride: int = 1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def build(width: int = 52, hidden: int = 1024, classes: int = 10) -> nn.Module:
    w = width
    return nn.Sequential(
        block(3, w, 2),  # 16x16
        block(w, 2 * w, 2),  # 8x8
        block(2 * w, 4 * w),
        block(4 * w, 4 * w, 2),  # 4x4
        block(4 * w, 8 * w),
        block(8 * w, 8 * w),
        nn.Flatten(),
        nn.Linear(8 * w * 16, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, classes),
    )
