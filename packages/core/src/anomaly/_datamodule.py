"""``AnomalyDataModule``: the LightningDataModule every datamodule subclasses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from anomaly._batch import collate
from anomaly._errors import ConfigError, DataError

__all__ = ["AnomalyDataModule", "SplitSummary"]


@dataclass(frozen=True, slots=True)
class SplitSummary:
    """How many images one split got, and from where; printed in every run summary.

    Attributes:
        split: ``train``, ``val`` or ``test``.
        images: Number of images.
        normal: Of which normal.
        abnormal: Of which anomalous.
        masks: Of which have a ground-truth mask.
        source: Where they come from, in words (``'good/ (80 %)'``).
    """

    split: str
    images: int
    normal: int
    abnormal: int
    masks: int
    source: str


class AnomalyDataModule(pl.LightningDataModule):
    """Base class of every datamodule.

    Subclasses validate all their inputs in ``setup()`` before any work and then assign
    ``self.train_data``, ``self.val_data`` and ``self.test_data`` (map-style datasets whose
    items are dicts with ``image`` (3, H, W) float in [0, 1], ``gt_label``, ``gt_mask``
    (H, W) bool or None, ``image_path``) and ``self.summaries``.

    Args:
        image_size: Side of the square images (or ``(height, width)``) every item is resized to.
        train_batch_size: Batch size of the training loader.
        eval_batch_size: Batch size of the validation, test and predict loaders.
        num_workers: Worker processes per loader; 0 loads in the main process.
        seed: Seed of every random split.
    """

    def __init__(
        self,
        image_size: int | Sequence[int] = 256,
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.image_size = _image_size(image_size)
        for name, value in (
            ("train_batch_size", train_batch_size),
            ("eval_batch_size", eval_batch_size),
        ):
            if not isinstance(value, int) or value < 1:
                msg = f"data.{name} must be a positive integer, got {value!r}"
                raise ConfigError(msg)
        if not isinstance(num_workers, int) or num_workers < 0:
            msg = f"data.num_workers must be a non-negative integer, got {num_workers!r}"
            raise ConfigError(msg)
        self.train_batch_size = train_batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_data: Dataset[Any] | None = None
        self.val_data: Dataset[Any] | None = None
        self.test_data: Dataset[Any] | None = None
        self.summaries: list[SplitSummary] = []

    def setup(self, stage: str | None = None) -> None:
        """Validate every input and build the splits; idempotent. Subclasses override."""

    def _loader(self, data: Dataset[Any] | None, split: str, batch_size: int) -> DataLoader[Any]:
        if data is None:
            msg = f"the datamodule has no {split} split; call setup() first or check its options"
            raise DataError(msg)
        return DataLoader(
            data,
            batch_size=batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader[Any]:
        """Return the loader of normal training images."""
        return self._loader(self.train_data, "train", self.train_batch_size)

    def val_dataloader(self) -> DataLoader[Any]:
        """Return the loader of the validation images that teach the post-processor."""
        return self._loader(self.val_data, "validation", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader[Any]:
        """Return the loader of the test images that metrics are computed on."""
        return self._loader(self.test_data, "test", self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader[Any]:
        """Return the test loader; predictions run on the test split."""
        return self._loader(self.test_data, "test", self.eval_batch_size)


def _image_size(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        size: tuple[int, ...] = (value, value)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        size = tuple(value)
    else:
        size = ()
    if len(size) != 2 or not all(isinstance(v, int) and 32 <= v <= 4096 for v in size):
        msg = (
            f"data.image_size must be an integer or [height, width] between 32 and 4096, "
            f"got {value!r}"
        )
        raise ConfigError(msg)
    return size[0], size[1]
