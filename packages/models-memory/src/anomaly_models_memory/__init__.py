"""Memory-bank and feature-statistics models for anomaly: PatchCore, PaDiM.

Classes are imported on first use, so loading the plugin module stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from anomaly_models_memory._common import NotFittedError
    from anomaly_models_memory.padim import Padim, PadimNet
    from anomaly_models_memory.patchcore import Patchcore, PatchcoreNet

__all__ = ["NotFittedError", "Padim", "PadimNet", "Patchcore", "PatchcoreNet"]

_LAZY = {
    "NotFittedError": "anomaly_models_memory._common",
    "Padim": "anomaly_models_memory.padim",
    "PadimNet": "anomaly_models_memory.padim",
    "Patchcore": "anomaly_models_memory.patchcore",
    "PatchcoreNet": "anomaly_models_memory.patchcore",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        msg = f"module 'anomaly_models_memory' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
