"""Datamodules for anomaly: folder, MVTec AD and the built-in demo dataset.

Importing this package is light: the classes below are imported (with torch) only when
first used, so the plugin manager can load ``anomaly_data.plugin`` cheaply.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from anomaly_data.datamodules import (
        Demo,
        Folder,
        ImageFolderDataModule,
        MvtecAd,
        ValSplitMode,
    )
    from anomaly_data.datasets import AnomalyImageDataset, Sample
    from anomaly_data.datasets.demo import DEMO_CATEGORIES, ensure_demo_dataset
    from anomaly_data.datasets.download import DownloadInfo, download_and_extract

__version__ = "0.1.0"

_LAZY = {
    "AnomalyImageDataset": "anomaly_data.datasets",
    "DEMO_CATEGORIES": "anomaly_data.datasets.demo",
    "Demo": "anomaly_data.datamodules",
    "DownloadInfo": "anomaly_data.datasets.download",
    "Folder": "anomaly_data.datamodules",
    "ImageFolderDataModule": "anomaly_data.datamodules",
    "MvtecAd": "anomaly_data.datamodules",
    "Sample": "anomaly_data.datasets",
    "ValSplitMode": "anomaly_data.datamodules",
    "download_and_extract": "anomaly_data.datasets.download",
    "ensure_demo_dataset": "anomaly_data.datasets.demo",
}

__all__ = [
    "DEMO_CATEGORIES",
    "AnomalyImageDataset",
    "Demo",
    "DownloadInfo",
    "Folder",
    "ImageFolderDataModule",
    "MvtecAd",
    "Sample",
    "ValSplitMode",
    "__version__",
    "download_and_extract",
    "ensure_demo_dataset",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        msg = f"module 'anomaly_data' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
