"""PaDiM (Defard et al., 2021): a Gaussian of pretrained features at every position."""

from __future__ import annotations

from anomaly_models_memory.padim.lightning_model import Padim
from anomaly_models_memory.padim.torch_model import PadimNet

__all__ = ["Padim", "PadimNet"]
