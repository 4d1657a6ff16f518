"""PatchCore (Roth et al., 2022): a coreset memory bank of nominal patch features."""

from __future__ import annotations

from anomaly_models_memory.patchcore.lightning_model import Patchcore
from anomaly_models_memory.patchcore.torch_model import PatchcoreNet

__all__ = ["Patchcore", "PatchcoreNet"]
