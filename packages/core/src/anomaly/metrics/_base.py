"""``AnomalyMetric``: the base class of every image- and pixel-level metric."""

from __future__ import annotations

import abc
import logging
import math
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import numpy.typing as npt

from anomaly._errors import DataError

if TYPE_CHECKING:
    import torch

    from anomaly._batch import Batch

__all__ = ["AnomalyMetric"]

logger = logging.getLogger(__name__)


class AnomalyMetric(abc.ABC):
    """Accumulate post-processed batches, then compute one number.

    Subclasses set the class attributes ``name`` (the registry name) and ``level``
    (``"image"`` or ``"pixel"``), take their options as keyword arguments (invalid values
    raise ``ConfigError``) and implement ``update``, ``compute`` and ``reset``.

    A metric that cannot be computed on the data it saw (no masks, only normal images, ...)
    does not raise: ``compute()`` returns ``float("nan")`` and sets ``reason`` to a short
    phrase such as ``"no masks"``, so a run can report ``n/a (no masks)`` and go on. After a
    successful ``compute()`` ``reason`` is None. Inconsistent inputs (missing predictions,
    mismatched shapes, NaN scores) are errors and raise ``DataError`` from ``update``.

    Threshold-free metrics rank by ``batch.raw_score`` / ``batch.raw_map`` when present (the
    model's unclipped output, which post-processing keeps), else by ``pred_score`` /
    ``anomaly_map``.

    Attributes:
        reason: Why the last ``compute()`` returned NaN; None when it returned a number.
    """

    name: ClassVar[str]
    level: ClassVar[str]

    def __init__(self) -> None:
        self.reason: str | None = None

    @abc.abstractmethod
    def update(self, batch: Batch) -> None:
        """Add one batch of predictions and ground truth.

        Raises:
            DataError: When the batch lacks the predictions the metric reads or its
                shapes disagree.
        """

    @abc.abstractmethod
    def compute(self) -> float:
        """Return the metric over every batch seen since the last ``reset``.

        Returns:
            The value, or NaN with ``reason`` set when the data cannot define it.
        """

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget every batch seen so far."""

    def _unavailable(self, reason: str) -> float:
        """Record why the metric is undefined and return NaN."""
        self.reason = reason
        logger.debug("%s is not available: %s", self.name, reason)
        return math.nan

    def _available(self, value: float) -> float:
        self.reason = None
        return value

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def to_numpy(tensor: torch.Tensor, dtype: type[np.generic]) -> npt.NDArray[np.generic]:
    """Return a detached CPU copy of ``tensor`` as a numpy array of ``dtype``."""
    return np.asarray(tensor.detach().cpu().numpy(), dtype=dtype)


def squeeze_channel(tensor: torch.Tensor) -> torch.Tensor:
    """Accept (B, 1, H, W) for a (B, H, W) field: some models keep a channel axis."""
    if tensor.ndim == 4 and tensor.shape[1] == 1:
        return tensor[:, 0]
    return tensor


def check_finite(values: npt.NDArray[np.floating], what: str, metric: str) -> None:
    """Reject NaN scores, which no ranking can place; infinities sort fine."""
    nans = int(np.isnan(values).sum())
    if nans:
        msg = (
            f"{metric}: {nans} of {values.size} {what} are NaN; "
            "check the model output (a diverged training run produces NaN scores)"
        )
        raise DataError(msg)
