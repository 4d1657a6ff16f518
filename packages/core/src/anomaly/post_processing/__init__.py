"""Thresholds and normalization learned on validation data, applied to every prediction."""

from __future__ import annotations

from anomaly.post_processing._post_processor import (
    PostProcessor,
    f1_optimal_threshold,
    normalize,
)

__all__ = ["PostProcessor", "f1_optimal_threshold", "normalize"]
