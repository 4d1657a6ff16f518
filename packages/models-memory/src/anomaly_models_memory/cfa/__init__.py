"""CFA (Lee et al., 2022): a patch descriptor adapted to a memory bank of normal features."""

from __future__ import annotations

from anomaly_models_memory.cfa.lightning_model import Cfa
from anomaly_models_memory.cfa.torch_model import CfaNet

__all__ = ["Cfa", "CfaNet"]
