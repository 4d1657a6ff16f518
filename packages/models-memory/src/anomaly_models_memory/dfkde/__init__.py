"""DFKDE: Gaussian kernel density of PCA-reduced, globally pooled deep features."""

from __future__ import annotations

from anomaly_models_memory.dfkde.lightning_model import Dfkde
from anomaly_models_memory.dfkde.torch_model import DfkdeNet

__all__ = ["Dfkde", "DfkdeNet"]
