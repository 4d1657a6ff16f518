"""Exporters: a fitted model with its pre- and post-processing, for torch, ONNX and OpenVINO.

Every export is a folder holding the model file and ``metadata.json``. The graph takes one
input, ``image`` (N, 3, H, W) float32 RGB in [0, 1] with any N, H and W, and returns
``pred_score`` (N,), ``pred_label`` (N,), ``anomaly_map`` (N, H, W) and ``pred_mask``
(N, H, W): resizing to the model's input size, the model and the learned normalization and
thresholds are inside, so runtimes need nothing else. The exporters are registered as
``torch``, ``onnx`` and ``openvino``; ``anomaly.Engine.export`` and ``anomaly export`` call
them by name. They need ``anomaly-deploy[export]`` (torch, anomaly-core, onnx, onnxscript,
nncf).
"""

from __future__ import annotations

from anomaly_deploy.export._calibration import CalibrationSource, calibration_images
from anomaly_deploy.export._graph import INPUT_NAME, OUTPUT_NAMES, InferenceGraph
from anomaly_deploy.export._onnx import export_onnx
from anomaly_deploy.export._openvino import export_openvino
from anomaly_deploy.export._torch import export_torch

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "CalibrationSource",
    "InferenceGraph",
    "calibration_images",
    "export_onnx",
    "export_openvino",
    "export_torch",
]
