"""The detectors, one class each; ``DETECTORS`` in the order the monitor runs them."""

from __future__ import annotations

from .base import CRITICAL, INFO, WARNING, Beat, Detector, End, GpuUtil, Point, Signal
from .system import CrashDetector, GpuUtilDetector, StallDetector, ThroughputDetector
from .training import DivergenceDetector, NanDetector, OverfitDetector, PlateauDetector, SpikeDetector

DETECTORS: tuple[type[Detector], ...] = (
    NanDetector,
    DivergenceDetector,
    SpikeDetector,
    PlateauDetector,
    OverfitDetector,
    StallDetector,
    ThroughputDetector,
    GpuUtilDetector,
    CrashDetector,
)
DETECTOR_NAMES: tuple[str, ...] = tuple(d.name for d in DETECTORS)

__all__ = [
    "CRITICAL",
    "DETECTORS",
    "DETECTOR_NAMES",
    "INFO",
    "WARNING",
    "Beat",
    "CrashDetector",
    "Detector",
    "DivergenceDetector",
    "End",
    "GpuUtil",
    "GpuUtilDetector",
    "NanDetector",
    "OverfitDetector",
    "PlateauDetector",
    "Point",
    "Signal",
    "SpikeDetector",
    "StallDetector",
    "ThroughputDetector",
]
