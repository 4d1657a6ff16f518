"""Image- and pixel-level anomaly-detection metrics.

Every metric is an ``AnomalyMetric``: ``update(batch)`` with post-processed batches, then
``compute()``. Threshold-free metrics (AUROC, F1-max, AUPRO) rank by the model's raw
scores; ``ImageF1`` judges the labels at the threshold learned on validation. A metric the
data cannot define returns NaN and says why in ``reason``.

Example:
    >>> import torch
    >>> from anomaly import Batch
    >>> from anomaly.metrics import ImageAUROC
    >>> metric = ImageAUROC()
    >>> metric.update(
    ...     Batch(
    ...         image=torch.zeros(4, 3, 8, 8),
    ...         gt_label=torch.tensor([0, 0, 1, 1]),
    ...         pred_score=torch.tensor([0.1, 0.4, 0.35, 0.8]),
    ...     )
    ... )
    >>> metric.compute()
    0.75
"""

from __future__ import annotations

from anomaly.metrics._base import AnomalyMetric
from anomaly.metrics._image import ImageAUROC, ImageF1, ImageF1Max
from anomaly.metrics._pixel import AUPRO, PixelAUROC, PixelF1Max

__all__ = [
    "AUPRO",
    "AnomalyMetric",
    "ImageAUROC",
    "ImageF1",
    "ImageF1Max",
    "PixelAUROC",
    "PixelF1Max",
]
