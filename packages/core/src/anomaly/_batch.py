"""The typed batch that flows from datamodules through models to metrics and visualizers."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["Batch", "collate"]


@dataclass(frozen=True, slots=True)
class Batch:
    """A batch of images with ground truth and, after a model ran, predictions.

    Attributes:
        image: (B, 3, H, W) float32 in [0, 1].
        gt_label: (B,) int64, 0 normal, 1 anomalous; None when unknown.
        gt_mask: (B, H, W) bool, True on defective pixels; None when the data has no masks.
        image_path: B source paths (empty strings for in-memory images).
        pred_score: (B,) float32 image score; raw from a model, in [0, 1] after post-processing.
        anomaly_map: (B, H, W) float32 pixel scores; raw, or in [0, 1] after post-processing.
        pred_label: (B,) int64, 1 where ``pred_score`` passes the threshold.
        pred_mask: (B, H, W) bool, True where ``anomaly_map`` passes the pixel threshold.
        raw_score: (B,) the model's score before normalization, kept by post-processing so
            threshold-free metrics (AUROC, AUPRO, F1-max) see the unclipped ranking.
        raw_map: (B, H, W) the model's anomaly map before normalization.
    """

    image: torch.Tensor
    gt_label: torch.Tensor | None = None
    gt_mask: torch.Tensor | None = None
    image_path: Sequence[str] = field(default_factory=tuple)
    pred_score: torch.Tensor | None = None
    anomaly_map: torch.Tensor | None = None
    pred_label: torch.Tensor | None = None
    pred_mask: torch.Tensor | None = None
    raw_score: torch.Tensor | None = None
    raw_map: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def replace(self, **changes: object) -> Batch:
        """Return a copy with the given fields replaced."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]  # fields checked by dataclasses

    def to(self, device: torch.device | str) -> Batch:
        """Return a copy with every tensor on ``device``."""
        changes = {
            item.name: value.to(device)
            for item in dataclasses.fields(self)
            if isinstance(value := getattr(self, item.name), torch.Tensor)
        }
        return self.replace(**changes)

    def detach_cpu(self) -> Batch:
        """Return a copy with every tensor detached and on the CPU."""
        changes = {
            item.name: value.detach().cpu()
            for item in dataclasses.fields(self)
            if isinstance(value := getattr(self, item.name), torch.Tensor)
        }
        return self.replace(**changes)


def collate(items: Sequence[Mapping[str, object]]) -> Batch:
    """Stack dataset items (dicts with ``image``, ``gt_label``, ``gt_mask``, ``image_path``).

    ``gt_mask`` is kept only when every item has one; ``gt_label`` only when every item has one.
    """
    images = torch.stack([_tensor(item["image"]) for item in items])
    labels = [item.get("gt_label") for item in items]
    masks = [item.get("gt_mask") for item in items]
    gt_label = (
        torch.tensor([int(label) for label in labels], dtype=torch.int64)  # type: ignore[call-overload]
        if all(label is not None for label in labels)
        else None
    )
    gt_mask = (
        torch.stack([_tensor(mask).bool() for mask in masks])
        if all(mask is not None for mask in masks)
        else None
    )
    paths = tuple(str(item.get("image_path", "")) for item in items)
    return Batch(image=images, gt_label=gt_label, gt_mask=gt_mask, image_path=paths)


def _tensor(value: object) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.as_tensor(value)
