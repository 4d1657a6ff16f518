"""Memory-bank and feature-statistics models for anomaly: PatchCore, PaDiM, DFKDE, DFM, CFA.

Classes are imported on first use, so loading the plugin module stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from anomaly_models_memory._common import NotFittedError
    from anomaly_models_memory.cfa import Cfa, CfaNet
    from anomaly_models_memory.dfkde import Dfkde, DfkdeNet
    from anomaly_models_memory.dfm import Dfm, DfmNet
    from anomaly_models_memory.padim import Padim, PadimNet
    from anomaly_models_memory.patchcore import Patchcore, PatchcoreNet

__all__ = [
    "Cfa",
    "CfaNet",
    "Dfkde",
    "DfkdeNet",
    "Dfm",
    "DfmNet",
    "NotFittedError",
    "Padim",
    "PadimNet",
    "Patchcore",
    "PatchcoreNet",
]

_LAZY = {
    "Cfa": "anomaly_models_memory.cfa",
    "CfaNet": "anomaly_models_memory.cfa",
    "Dfkde": "anomaly_models_memory.dfkde",
    "DfkdeNet": "anomaly_models_memory.dfkde",
    "Dfm": "anomaly_models_memory.dfm",
    "DfmNet": "anomaly_models_memory.dfm",
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
