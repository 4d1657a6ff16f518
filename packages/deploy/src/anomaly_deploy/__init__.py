"""Exporters, inferencers and serving for anomaly.

Importing this package is cheap and imports no torch: the names below resolve on first use.
``Prediction``, the inferencers and ``load_inferencer`` need numpy, Pillow, OpenCV and a
runtime (ONNX Runtime or OpenVINO); the exporters need ``anomaly-deploy[export]``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anomaly_deploy.errors import ArtefactError, DeployError, InputError, OptionError
    from anomaly_deploy.export import export_onnx, export_openvino, export_torch
    from anomaly_deploy.inference import (
        Inferencer,
        OnnxInferencer,
        OpenVINOInferencer,
        Prediction,
        TorchInferencer,
        load_inferencer,
    )

__all__ = [
    "ArtefactError",
    "DeployError",
    "Inferencer",
    "InputError",
    "OnnxInferencer",
    "OpenVINOInferencer",
    "OptionError",
    "Prediction",
    "TorchInferencer",
    "export_onnx",
    "export_openvino",
    "export_torch",
    "load_inferencer",
]

_LAZY = {
    "ArtefactError": "anomaly_deploy.errors",
    "DeployError": "anomaly_deploy.errors",
    "InputError": "anomaly_deploy.errors",
    "OptionError": "anomaly_deploy.errors",
    "Inferencer": "anomaly_deploy.inference",
    "OnnxInferencer": "anomaly_deploy.inference",
    "OpenVINOInferencer": "anomaly_deploy.inference",
    "Prediction": "anomaly_deploy.inference",
    "TorchInferencer": "anomaly_deploy.inference",
    "load_inferencer": "anomaly_deploy.inference",
    "export_onnx": "anomaly_deploy.export",
    "export_openvino": "anomaly_deploy.export",
    "export_torch": "anomaly_deploy.export",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        msg = f"module 'anomaly_deploy' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
