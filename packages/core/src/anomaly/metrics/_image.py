"""Image-level metrics: AUROC and F1-max of image scores, F1 of predicted labels."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import numpy.typing as npt

from anomaly._errors import DataError
from anomaly.metrics import _functional
from anomaly.metrics._base import AnomalyMetric, check_finite, to_numpy

if TYPE_CHECKING:
    from anomaly._batch import Batch

__all__ = ["ImageAUROC", "ImageF1", "ImageF1Max"]


class _ImageMetric(AnomalyMetric):
    """Collect one value per image with its ground-truth label.

    Images of a batch without ``gt_label`` are skipped: their class is unknown.
    """

    level: ClassVar[str] = "image"

    def __init__(self) -> None:
        super().__init__()
        self._values: list[npt.NDArray[np.float64]] = []
        self._labels: list[npt.NDArray[np.bool_]] = []
        self._unlabelled = 0

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self._values, self._labels = [], []
        self._unlabelled = 0
        self.reason = None

    def update(self, batch: Batch) -> None:
        """Add the images of ``batch`` that have a ground-truth label.

        Raises:
            DataError: When the batch lacks the prediction this metric reads, its size
                differs from the number of labels, or a score is NaN.
        """
        if batch.gt_label is None:
            self._unlabelled += len(batch)
            return
        values = self._read(batch).reshape(-1)
        labels = to_numpy(batch.gt_label, np.int64).reshape(-1)
        if values.size != labels.size:
            msg = (
                f"{self.name}: {values.size} predictions for {labels.size} labels in one batch; "
                "predictions and gt_label must have one entry per image"
            )
            raise DataError(msg)
        self._values.append(values)
        self._labels.append(labels != 0)

    @abc.abstractmethod
    def _read(self, batch: Batch) -> npt.NDArray[np.float64]:
        """Return the (B,) per-image values this metric needs from ``batch``."""

    def _gathered(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]] | str:
        """Return all values and labels, or why there are none."""
        if not self._labels:
            return "no labels" if self._unlabelled else "no images"
        return np.concatenate(self._values), np.concatenate(self._labels)


class _ImageScoreMetric(_ImageMetric):
    """Rank images by their unclipped score."""

    def _read(self, batch: Batch) -> npt.NDArray[np.float64]:
        score = batch.raw_score if batch.raw_score is not None else batch.pred_score
        if score is None:
            msg = f"{self.name}: the batch has no pred_score; run the model on it first"
            raise DataError(msg)
        values = to_numpy(score, np.float64).astype(np.float64, copy=False)
        check_finite(values, "image scores", self.name)
        return values


class ImageAUROC(_ImageScoreMetric):
    """Area under the ROC curve of image scores, exact (every distinct score a threshold).

    NaN with ``reason`` ``"no anomalous images"`` or ``"no normal images"`` when the test
    images hold one class only, ``"no labels"`` when no image had a label.
    """

    name: ClassVar[str] = "image_auroc"

    def compute(self) -> float:
        """Return the AUROC in [0, 1] (0.5 is chance), or NaN with ``reason`` set."""
        gathered = self._gathered()
        if isinstance(gathered, str):
            return self._unavailable(gathered)
        scores, labels = gathered
        if not labels.any():
            return self._unavailable("no anomalous images")
        if labels.all():
            return self._unavailable("no normal images")
        return self._available(_functional.auroc(np.sort(scores[~labels]), scores[labels]))


class ImageF1Max(_ImageScoreMetric):
    """Best F1 of image scores over every threshold (anomalous when score >= threshold).

    Threshold-free: it measures how separable the scores are, not the learned threshold
    (see ``ImageF1`` for that). NaN with ``reason`` ``"no anomalous images"`` when there is
    nothing to find, ``"no labels"`` when no image had a label.
    """

    name: ClassVar[str] = "image_f1_max"

    def compute(self) -> float:
        """Return the best F1 in [0, 1], or NaN with ``reason`` set."""
        gathered = self._gathered()
        if isinstance(gathered, str):
            return self._unavailable(gathered)
        scores, labels = gathered
        if not labels.any():
            return self._unavailable("no anomalous images")
        return self._available(_functional.f1_max(np.sort(scores[~labels]), scores[labels]))


class ImageF1(_ImageMetric):
    """F1 of ``pred_label`` (the label at the threshold learned on validation) vs ``gt_label``.

    NaN with ``reason`` ``"no anomalous images"`` when there is nothing to find, ``"no
    labels"`` when no image had a label.
    """

    name: ClassVar[str] = "image_f1"

    def _read(self, batch: Batch) -> npt.NDArray[np.float64]:
        if batch.pred_label is None:
            msg = (
                f"{self.name}: the batch has no pred_label; "
                "apply post-processing (a fitted model's predict_batch) before the metrics"
            )
            raise DataError(msg)
        return to_numpy(batch.pred_label, np.float64).astype(np.float64, copy=False)

    def compute(self) -> float:
        """Return F1 in [0, 1], or NaN with ``reason`` set."""
        gathered = self._gathered()
        if isinstance(gathered, str):
            return self._unavailable(gathered)
        predicted, labels = gathered
        if not labels.any():
            return self._unavailable("no anomalous images")
        predicted_positive = predicted != 0
        true_pos = int(np.sum(predicted_positive & labels))
        # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (predicted positives + actual positives).
        return self._available(2.0 * true_pos / (int(predicted_positive.sum()) + int(labels.sum())))
