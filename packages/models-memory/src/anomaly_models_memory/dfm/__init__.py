"""DFM (Ahuja et al., 2019): PCA of pooled deep features, reconstruction error or likelihood."""

from __future__ import annotations

from anomaly_models_memory.dfm.lightning_model import Dfm
from anomaly_models_memory.dfm.torch_model import DfmNet

__all__ = ["Dfm", "DfmNet"]
