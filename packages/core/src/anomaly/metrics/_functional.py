"""Exact threshold-free curve statistics on sorted score arrays.

Every kernel takes the scores of negative samples sorted ascending and the scores of positive
samples in any order. Positives are usually far fewer than negatives (defective pixels are a
few percent of a test set), so the kernels cost one sort of the negatives, done by the caller
in place, plus ``O(P log N)`` binary searches: no per-threshold loop and no index arrays the
size of the whole test set. Ties between a positive and a negative count half, as in
scikit-learn's trapezoidal ROC area.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["auroc", "f1_max", "overlap_area"]

# Positives are searched in slices of this size so the int64 index arrays stay small.
_CHUNK = 1 << 20


def auroc(negatives: npt.NDArray[np.floating], positives: npt.NDArray[np.floating]) -> float:
    """Return the exact area under the ROC curve.

    Computed as the Mann-Whitney statistic: the share of (positive, negative) pairs that the
    scores order correctly, ties counted half, which equals the trapezoidal ROC area.

    Args:
        negatives: (N,) scores of negatives, sorted ascending, N >= 1.
        positives: (P,) scores of positives, P >= 1.
    """
    twice_wins = 0
    for start in range(0, positives.size, _CHUNK):
        chunk = positives[start : start + _CHUNK]
        below = np.searchsorted(negatives, chunk, side="left")
        not_above = np.searchsorted(negatives, chunk, side="right")
        # 2 * (below + ties / 2) kept in integers: exact for any test set size.
        twice_wins += int(below.sum(dtype=np.int64)) + int(not_above.sum(dtype=np.int64))
    return twice_wins / (2.0 * positives.size * negatives.size)


def f1_max(negatives: npt.NDArray[np.floating], positives: npt.NDArray[np.floating]) -> float:
    """Return the best F1 over every threshold (a sample is positive when score >= threshold).

    The optimum lies at a positive's score: lowering the threshold to the next positive only
    adds false positives, so only the distinct positive scores are tried.

    Args:
        negatives: (N,) scores of negatives, sorted ascending; may be empty.
        positives: (P,) scores of positives, P >= 1.
    """
    positives = np.sort(positives)
    thresholds = np.unique(positives)
    best = 0.0
    for start in range(0, thresholds.size, _CHUNK):
        chunk = thresholds[start : start + _CHUNK]
        true_pos = positives.size - np.searchsorted(positives, chunk, side="left")
        false_pos = negatives.size - np.searchsorted(negatives, chunk, side="left")
        # F1 = 2 TP / (2 TP + FP + FN) with FN = P - TP.
        f1 = 2.0 * true_pos / (true_pos + false_pos + positives.size)
        best = max(best, float(f1.max()))
    return best


def overlap_area(
    negatives: npt.NDArray[np.floating],
    positives: npt.NDArray[np.floating],
    weights: npt.NDArray[np.float64],
    fpr_limit: float = 1.0,
) -> float:
    """Return the normalized area under a weighted recall curve against the false-positive rate.

    The curve has one point per distinct score ``t``: x is the share of negatives scoring
    ``>= t``, y the summed weight of positives scoring ``>= t``. With weights ``1 / P`` it is
    the ROC curve; with weights ``1 / (regions * region size)`` it is the per-region-overlap
    curve of AUPRO. The area from x = 0 to ``fpr_limit`` (the curve linearly interpolated at
    the limit, trapezoids between points) is divided by ``fpr_limit``, so 1 is perfect.

    Only distinct negative scores move x; between them y rises at constant x and adds no
    area. So each distinct negative score ``v`` contributes one trapezoid from
    ``(x(> v), y(> v))`` to ``(x(>= v), y(>= v))``.

    Args:
        negatives: (N,) scores of negatives, sorted ascending, N >= 1.
        positives: (P,) scores of positives.
        weights: (P,) non-negative weight of each positive; they usually sum to 1.
        fpr_limit: Upper end of the integrated false-positive rate, in (0, 1].
    """
    order = np.argsort(positives, kind="stable")
    positives_sorted = positives[order]
    # cumulative[i]: weight of the i lowest-scoring positives.
    cumulative = np.concatenate([[0.0], np.cumsum(weights[order], dtype=np.float64)])
    total = float(cumulative[-1])
    count = negatives.size
    # A score whose first (highest-ranked) occurrence sits at or past fpr_limit * N adds
    # nothing, so only the top ceil(limit * N) negatives can start a contributing segment.
    top = min(count, math.ceil(fpr_limit * count) + 1)
    values = np.unique(negatives[count - top :])
    area = 0.0
    # Chunks keep the per-value float64 arrays small on tens of millions of pixels.
    for start in range(0, values.size, _CHUNK):
        chunk = values[start : start + _CHUNK]
        x_start = (count - np.searchsorted(negatives, chunk, side="right")) / count
        x_end = (count - np.searchsorted(negatives, chunk, side="left")) / count
        y_start = total - cumulative[np.searchsorted(positives_sorted, chunk, side="right")]
        y_end = total - cumulative[np.searchsorted(positives_sorted, chunk, side="left")]
        keep = x_start < fpr_limit
        x_start, x_end, y_start, y_end = x_start[keep], x_end[keep], y_start[keep], y_end[keep]
        # The segment that crosses the limit is cut there, its y interpolated linearly.
        x_cut = np.minimum(x_end, fpr_limit)
        y_cut = y_start + (y_end - y_start) * (x_cut - x_start) / (x_end - x_start)
        area += float(np.sum((x_cut - x_start) * (y_start + y_cut) / 2.0, dtype=np.float64))
    return area / fpr_limit
