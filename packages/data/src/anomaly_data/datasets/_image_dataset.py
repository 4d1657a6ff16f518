"""The map-style dataset every datamodule of this package yields."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from anomaly.io import image_to_tensor, mask_to_tensor, read_image, read_mask

__all__ = ["AnomalyImageDataset", "Sample"]


@dataclass(frozen=True, slots=True)
class Sample:
    """One image on disk and its ground truth.

    Attributes:
        image_path: The image file.
        label: 0 normal, 1 anomalous.
        mask_path: Its mask file; None for normal images and for data without masks.
        source: The folder it was found in, relative to the dataset root (``'good/'``).
    """

    image_path: Path
    label: int
    mask_path: Path | None = None
    source: str = ""


class AnomalyImageDataset(Dataset[dict[str, object]]):
    """Read, resize and label the images of one split.

    Each item is a dict with ``image`` (3, H, W) float32 in [0, 1] at ``image_size``,
    ``gt_label`` (int, 0 or 1), ``gt_mask`` ((H, W) bool, or None when the dataset has no
    masks; normal images of a dataset with masks get an all-False mask) and ``image_path``.

    Args:
        samples: The images of the split, in order.
        image_size: ``(height, width)`` every image and mask is resized to.
        has_masks: Whether the dataset has masks at all.
    """

    def __init__(
        self, samples: Sequence[Sample], image_size: tuple[int, int], *, has_masks: bool
    ) -> None:
        self.samples = tuple(samples)
        self.image_size = image_size
        self.has_masks = has_masks

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, object]:
        sample = self.samples[index]
        image = image_to_tensor(read_image(sample.image_path), self.image_size)
        mask: torch.Tensor | None = None
        if sample.mask_path is not None:
            mask = mask_to_tensor(read_mask(sample.mask_path), self.image_size)
        elif self.has_masks:
            mask = torch.zeros(self.image_size, dtype=torch.bool)
        return {
            "image": image,
            "gt_label": sample.label,
            "gt_mask": mask,
            "image_path": str(sample.image_path),
        }

    @property
    def num_normal(self) -> int:
        """Number of normal images."""
        return sum(1 for sample in self.samples if sample.label == 0)

    @property
    def num_abnormal(self) -> int:
        """Number of anomalous images."""
        return len(self.samples) - self.num_normal

    @property
    def num_masks(self) -> int:
        """Number of anomalous images with a mask file (normal ones get an all-False mask)."""
        return sum(1 for sample in self.samples if sample.mask_path is not None)
