"""Learn thresholds and min-max statistics on validation data; normalize predictions.

After post-processing, ``pred_score`` and ``anomaly_map`` lie in [0, 1] with the learned
threshold at exactly 0.5: ``clip((x - threshold) / (max - min) + 0.5, 0, 1)``. The threshold is
F1-optimal where the validation data holds anomalies, and a high quantile of the normal scores
where it does not. All statistics are buffers, so they travel in checkpoints and exports.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from anomaly._batch import Batch
from anomaly._errors import ConfigError

__all__ = ["PostProcessor", "f1_optimal_threshold", "normalize"]

logger = logging.getLogger(__name__)


def f1_optimal_threshold(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Return the threshold that maximises F1 and that F1.

    A sample is predicted anomalous when its score is ``>=`` the threshold.

    Args:
        scores: (N,) scores, higher is more anomalous.
        labels: (N,) 0/1 or bool ground truth; at least one positive.

    Returns:
        ``(threshold, f1)``; the threshold is one of the scores.

    Example:
        >>> import torch
        >>> scores = torch.tensor([0.125, 0.5, 0.375, 0.75])
        >>> f1_optimal_threshold(scores, torch.tensor([0, 0, 1, 1]))
        (0.375, 0.8)
    """
    scores = scores.flatten().double()
    labels = labels.flatten().bool()
    positives = int(labels.sum())
    if positives == 0:
        msg = "f1_optimal_threshold needs at least one positive label"
        raise ValueError(msg)
    order = torch.argsort(scores, descending=True)
    sorted_scores = scores[order]
    true_positives = torch.cumsum(labels[order].double(), 0)
    predicted = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    # Only the last index of a run of equal scores is a valid cut.
    last_of_run = torch.ones_like(sorted_scores, dtype=torch.bool)
    last_of_run[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    f1 = 2 * true_positives / (predicted + positives)
    f1 = torch.where(last_of_run, f1, torch.full_like(f1, -1.0))
    best = int(torch.argmax(f1))
    return float(sorted_scores[best]), float(f1[best])


def normalize(
    values: torch.Tensor, threshold: torch.Tensor, minimum: torch.Tensor, maximum: torch.Tensor
) -> torch.Tensor:
    """Map raw scores to [0, 1] with ``threshold`` at 0.5 (min-max scaled, clipped).

    Example:
        >>> import torch
        >>> normalize(torch.tensor([0.0, 2.0, 3.0, 9.0]), *torch.tensor([2.0, 0.0, 4.0]))
        tensor([0.0000, 0.5000, 0.7500, 1.0000])
    """
    span = torch.clamp(maximum - minimum, min=torch.finfo(torch.float32).eps)
    return torch.clamp((values - threshold) / span + 0.5, 0.0, 1.0)


class PostProcessor(nn.Module):
    """Collect validation predictions, learn thresholds and normalization, apply them.

    Args:
        normal_quantile: Quantile of normal scores used as the threshold when the validation
            data holds no anomalies (image level) or no defective pixels (pixel level).
        max_pixels: Largest number of validation pixels kept for the pixel threshold; more
            are subsampled with a fixed stride, which keeps memory bounded on large sets.
    """

    image_threshold: torch.Tensor
    pixel_threshold: torch.Tensor
    image_min: torch.Tensor
    image_max: torch.Tensor
    pixel_min: torch.Tensor
    pixel_max: torch.Tensor
    fitted: torch.Tensor

    def __init__(self, normal_quantile: float = 0.99, max_pixels: int = 4_000_000) -> None:
        super().__init__()
        if not 0.0 < normal_quantile < 1.0:
            msg = f"post_processing.normal_quantile must lie in (0, 1), got {normal_quantile!r}"
            raise ConfigError(msg)
        if max_pixels < 1:
            msg = f"post_processing.max_pixels must be positive, got {max_pixels!r}"
            raise ConfigError(msg)
        self.normal_quantile = normal_quantile
        self.max_pixels = max_pixels
        for name in ("image_threshold", "pixel_threshold", "image_max", "pixel_max"):
            self.register_buffer(name, torch.tensor(0.5))
        for name in ("image_min", "pixel_min"):
            self.register_buffer(name, torch.tensor(0.0))
        self.register_buffer("fitted", torch.tensor(False))
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._maps: list[torch.Tensor] = []
        self._masks: list[torch.Tensor] = []

    def reset(self) -> None:
        """Forget collected validation predictions."""
        self._scores, self._labels, self._maps, self._masks = [], [], [], []

    def update(self, batch: Batch) -> None:
        """Collect raw predictions of one validation batch."""
        if batch.pred_score is None or batch.anomaly_map is None:
            msg = "PostProcessor.update needs a batch with pred_score and anomaly_map"
            raise ValueError(msg)
        self._scores.append(batch.pred_score.detach().float().cpu())
        labels = batch.gt_label if batch.gt_label is not None else torch.zeros(len(batch))
        self._labels.append(labels.detach().cpu().long())
        # Keep a strided subsample per batch so memory stays bounded.
        maps = batch.anomaly_map.detach().float().cpu().flatten(1)
        masks = (
            batch.gt_mask.detach().cpu().flatten(1)
            if batch.gt_mask is not None
            else torch.zeros_like(maps, dtype=torch.bool)
        )
        per_image = max(1, self.max_pixels // 1024)
        stride = max(1, maps.shape[1] // per_image)
        self._maps.append(maps[:, ::stride].flatten())
        self._masks.append(masks[:, ::stride].flatten())

    def compute(self) -> None:
        """Learn thresholds and min-max statistics from what ``update`` collected."""
        if not self._scores:
            msg = "no validation predictions were collected; give the datamodule a validation split"
            raise ValueError(msg)
        scores = torch.cat(self._scores)
        labels = torch.cat(self._labels)
        maps = torch.cat(self._maps)
        masks = torch.cat(self._masks)
        image_threshold = self._threshold(scores, labels.bool())
        if bool(masks.any()):
            pixel_threshold, _ = f1_optimal_threshold(maps, masks)
        else:
            normal_pixels = maps if bool(labels.bool().all()) else self._normal_pixels(labels)
            pixel_threshold = float(torch.quantile(_subsample(normal_pixels), self.normal_quantile))
        self.image_threshold.fill_(image_threshold)
        self.pixel_threshold.fill_(pixel_threshold)
        self.image_min.fill_(float(scores.min()))
        self.image_max.fill_(float(scores.max()))
        self.pixel_min.fill_(float(maps.min()))
        self.pixel_max.fill_(float(maps.max()))
        self.fitted.fill_(True)
        logger.info(
            "post-processing: image threshold %.4g, pixel threshold %.4g (%d validation images)",
            image_threshold,
            pixel_threshold,
            scores.numel(),
        )
        self.reset()

    def _threshold(self, scores: torch.Tensor, labels: torch.Tensor) -> float:
        if bool(labels.any()) and not bool(labels.all()):
            threshold, _ = f1_optimal_threshold(scores, labels)
            return threshold
        normal = scores[~labels] if bool((~labels).any()) else scores
        return float(torch.quantile(normal.double(), self.normal_quantile))

    def _normal_pixels(self, labels: torch.Tensor) -> torch.Tensor:
        per_image = [
            maps
            for maps, batch_labels in zip(self._maps, self._labels, strict=True)
            for maps in maps.reshape(batch_labels.numel(), -1)[batch_labels == 0]
        ]
        return torch.cat(per_image) if per_image else torch.cat(self._maps)

    def forward(self, batch: Batch) -> Batch:
        """Return ``batch`` with normalized scores and maps, ``pred_label`` and ``pred_mask``."""
        if batch.pred_score is None or batch.anomaly_map is None:
            msg = "PostProcessor needs a batch with pred_score and anomaly_map"
            raise ValueError(msg)
        score = normalize(batch.pred_score, self.image_threshold, self.image_min, self.image_max)
        amap = normalize(batch.anomaly_map, self.pixel_threshold, self.pixel_min, self.pixel_max)
        return batch.replace(
            pred_score=score,
            anomaly_map=amap,
            pred_label=(score >= 0.5).long(),
            pred_mask=amap >= 0.5,
            raw_score=batch.pred_score,
            raw_map=batch.anomaly_map,
        )


def _subsample(values: torch.Tensor, limit: int = 8_000_000) -> torch.Tensor:
    """torch.quantile refuses inputs above 16M elements; stride down to ``limit``."""
    stride = max(1, values.numel() // limit)
    return values[::stride].double()
