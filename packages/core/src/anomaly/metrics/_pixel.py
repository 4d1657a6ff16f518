"""Pixel-level metrics: AUROC, F1-max and AUPRO of anomaly maps against ground-truth masks.

Memory: the maps are kept exactly, as float32 scores split into normal and defective pixels
(4 bytes per test pixel, plus 8 per defective pixel for AUPRO's region ids): a 583-image test
set at 256 x 256 is 38 M pixels, about 155 MB. That keeps every metric exact (no binning,
which unbounded raw scores would make a two-pass affair) at a cost that fits any machine
that can hold the test set. ``compute()`` sorts the normal pixels once, in place, and all
curves are then read off with binary searches.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from anomaly._errors import ConfigError, DataError
from anomaly.metrics import _functional
from anomaly.metrics._base import AnomalyMetric, check_finite, squeeze_channel, to_numpy

if TYPE_CHECKING:
    from anomaly._batch import Batch

__all__ = ["AUPRO", "PixelAUROC", "PixelF1Max"]

logger = logging.getLogger(__name__)

# 8-connectivity, as in the MVTec AD evaluation: diagonal neighbours join one defect region.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


class _PixelMetric(AnomalyMetric):
    """Collect pixel scores of every image, split by the ground-truth mask.

    A batch without ``gt_mask`` whose images are all labelled normal counts as all-normal
    pixels; any other batch without ``gt_mask`` is skipped (its defects are unknown) and a
    warning is logged at ``compute()``.
    """

    level: ClassVar[str] = "pixel"

    def __init__(self) -> None:
        super().__init__()
        self._clear()

    def _clear(self) -> None:
        self._negatives: list[npt.NDArray[np.float32]] = []
        self._positives: list[npt.NDArray[np.float32]] = []
        self._masks_seen = False
        self._images = 0
        self._skipped = 0

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self._clear()
        self.reason = None

    def update(self, batch: Batch) -> None:
        """Add the pixel scores and masks of ``batch``.

        Raises:
            DataError: When the batch has no anomaly map, the map and mask shapes differ,
                or a score is NaN.
        """
        read = self._read(batch)
        if read is not None:
            self._add(*read)

    def _read(self, batch: Batch) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]] | None:
        """Return (B, H, W) float32 scores and bool masks, or None to skip the batch."""
        anomaly_map = batch.raw_map if batch.raw_map is not None else batch.anomaly_map
        if anomaly_map is None:
            msg = f"{self.name}: the batch has no anomaly_map; run the model on it first"
            raise DataError(msg)
        anomaly_map = squeeze_channel(anomaly_map)
        if anomaly_map.ndim != 3:
            msg = (
                f"{self.name}: anomaly_map has shape {tuple(anomaly_map.shape)!r}; "
                "expected (B, H, W)"
            )
            raise DataError(msg)
        scores = to_numpy(anomaly_map, np.float32).astype(np.float32, copy=False)
        if batch.gt_mask is not None:
            gt_mask = squeeze_channel(batch.gt_mask)
            if tuple(gt_mask.shape) != tuple(anomaly_map.shape):
                msg = (
                    f"{self.name}: gt_mask shape {tuple(gt_mask.shape)!r} differs from "
                    f"anomaly_map shape {tuple(anomaly_map.shape)!r}; "
                    "resize masks and maps to the same size in the datamodule or model"
                )
                raise DataError(msg)
            masks = to_numpy(gt_mask, np.bool_).astype(np.bool_, copy=False)
            self._masks_seen = True
        elif batch.gt_label is not None and not bool((batch.gt_label != 0).any()):
            masks = np.zeros(scores.shape, dtype=np.bool_)
        else:
            self._skipped += len(batch)
            return None
        check_finite(scores, "pixel scores", self.name)
        self._images += scores.shape[0]
        return scores, masks

    def _add(self, scores: npt.NDArray[np.float32], masks: npt.NDArray[np.bool_]) -> None:
        self._negatives.append(scores[~masks])
        self._positives.append(scores[masks])

    def _sorted_negatives(self) -> npt.NDArray[np.float32]:
        """Return every normal pixel's score, sorted ascending (and stored sorted)."""
        # Pixel order never matters, so the collected list is consolidated and sorted in
        # place: one copy of the scores in memory, and later calls skip the work.
        if len(self._negatives) != 1:
            self._negatives = [np.concatenate(self._negatives or [np.empty(0, np.float32)])]
        self._negatives[0].sort()
        return self._negatives[0]

    def _positive_scores(self) -> npt.NDArray[np.float32]:
        if len(self._positives) != 1:
            self._positives = [np.concatenate(self._positives or [np.empty(0, np.float32)])]
        return self._positives[0]

    def _why_unavailable(self, need_normal: bool) -> str | None:
        """Return why the collected pixels cannot define the metric, or None."""
        if self._skipped:
            logger.warning(
                "%s: skipped %d images whose batches had anomalous images but no gt_mask",
                self.name,
                self._skipped,
            )
        if self._images == 0 and self._skipped == 0:
            return "no images"
        if not self._masks_seen:
            return "no masks"
        if not any(part.size for part in self._positives):
            return "no defective pixels"
        if need_normal and not any(part.size for part in self._negatives):
            return "no normal pixels"
        return None


class PixelAUROC(_PixelMetric):
    """Area under the ROC curve of pixel scores, exact over every pixel of every test image.

    NaN with ``reason`` ``"no masks"`` when the data has no ground-truth masks, ``"no
    defective pixels"`` or ``"no normal pixels"`` when the masks hold one class only.
    """

    name: ClassVar[str] = "pixel_auroc"

    def compute(self) -> float:
        """Return the AUROC in [0, 1] (0.5 is chance), or NaN with ``reason`` set."""
        reason = self._why_unavailable(need_normal=True)
        if reason is not None:
            return self._unavailable(reason)
        return self._available(_functional.auroc(self._sorted_negatives(), self._positive_scores()))


class PixelF1Max(_PixelMetric):
    """Best F1 of pixel scores over every threshold (defective when score >= threshold).

    NaN with ``reason`` ``"no masks"`` or ``"no defective pixels"``.
    """

    name: ClassVar[str] = "pixel_f1_max"

    def compute(self) -> float:
        """Return the best F1 in [0, 1], or NaN with ``reason`` set."""
        reason = self._why_unavailable(need_normal=False)
        if reason is not None:
            return self._unavailable(reason)
        return self._available(
            _functional.f1_max(self._sorted_negatives(), self._positive_scores())
        )


class AUPRO(_PixelMetric):
    """Normalized area under the per-region-overlap curve (Bergmann et al., MVTec AD, 2021).

    Each connected defect region of each ground-truth mask (8-connectivity) counts equally,
    however small: at a threshold ``t`` the per-region overlap (PRO) is the mean over regions
    of the share of the region's pixels scoring ``>= t``, and the false-positive rate is the
    share of all normal pixels (of every image) scoring ``>= t``. The PRO curve over every
    distinct score is integrated against the FPR from 0 to ``fpr_limit`` (linearly
    interpolated at the limit) and divided by ``fpr_limit``, so a perfect model scores 1.
    Normal images contribute to the FPR only.

    Args:
        fpr_limit: Largest false-positive rate integrated, in (0, 1]; 0.3 as in the paper.

    NaN with ``reason`` ``"no masks"``, ``"no defective pixels"`` or ``"no normal pixels"``.
    """

    name: ClassVar[str] = "aupro"

    def __init__(self, *, fpr_limit: float = 0.3) -> None:
        if (
            isinstance(fpr_limit, bool)
            or not isinstance(fpr_limit, int | float)
            or not 0.0 < fpr_limit <= 1.0
        ):
            msg = f"aupro.fpr_limit must be a number in (0, 1], got {fpr_limit!r}; use e.g. 0.3"
            raise ConfigError(msg)
        self.fpr_limit = float(fpr_limit)
        super().__init__()

    def _clear(self) -> None:
        super()._clear()
        self._region_ids: list[npt.NDArray[np.int64]] = []
        self._region_sizes: list[npt.NDArray[np.int64]] = []
        self._regions = 0

    def _add(self, scores: npt.NDArray[np.float32], masks: npt.NDArray[np.bool_]) -> None:
        self._negatives.append(scores[~masks])
        for image_scores, mask in zip(scores, masks, strict=True):
            if not mask.any():
                continue
            regions, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
            # Labels run 1..count; shift them to ids unique across the whole test set.
            ids = regions[mask].astype(np.int64) - 1
            self._positives.append(image_scores[mask])
            self._region_ids.append(ids + self._regions)
            self._region_sizes.append(np.bincount(ids, minlength=count).astype(np.int64))
            self._regions += count

    def compute(self) -> float:
        """Return the normalized AUPRO in [0, 1], or NaN with ``reason`` set."""
        reason = self._why_unavailable(need_normal=True)
        if reason is not None:
            return self._unavailable(reason)
        if len(self._region_ids) != 1:
            self._region_ids = [np.concatenate(self._region_ids)]
            self._region_sizes = [np.concatenate(self._region_sizes)]
        sizes = self._region_sizes[0].astype(np.float64)
        weights = 1.0 / (sizes.size * sizes[self._region_ids[0]])
        return self._available(
            _functional.overlap_area(
                self._sorted_negatives(), self._positive_scores(), weights, self.fpr_limit
            )
        )

    def __repr__(self) -> str:
        return f"AUPRO(fpr_limit={self.fpr_limit!r})"
