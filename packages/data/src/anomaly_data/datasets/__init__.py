"""Datasets, the demo-data generator and the archive downloader."""

from __future__ import annotations

from ._image_dataset import AnomalyImageDataset, Sample

__all__ = ["AnomalyImageDataset", "Sample"]
