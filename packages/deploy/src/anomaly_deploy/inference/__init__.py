"""Run exported models without torch: ONNX Runtime, OpenVINO, or torch when it is there.

Everything here needs numpy, Pillow and OpenCV; each runtime is imported when its
inferencer is built, and only ``TorchInferencer`` imports torch.

Example:
    >>> from anomaly_deploy.inference import load_inferencer  # doctest: +SKIP
    >>> inferencer = load_inferencer("results/export/onnx")  # doctest: +SKIP
    >>> for prediction in inferencer.predict_source("new_images/"):  # doctest: +SKIP
    ...     print(prediction.source, prediction.pred_score, prediction.pred_label)
"""

from __future__ import annotations

from anomaly_deploy.inference._base import (
    Inferencer,
    Prediction,
    PredictionStream,
    load_inferencer,
    read_metadata,
)
from anomaly_deploy.inference._onnx import OnnxInferencer
from anomaly_deploy.inference._openvino import OpenVINOInferencer
from anomaly_deploy.inference._results import PredictionWriter
from anomaly_deploy.inference._torch import TorchInferencer
from anomaly_deploy.inference._visualize import colorize, overlay, render

__all__ = [
    "Inferencer",
    "OnnxInferencer",
    "OpenVINOInferencer",
    "Prediction",
    "PredictionStream",
    "PredictionWriter",
    "TorchInferencer",
    "colorize",
    "load_inferencer",
    "overlay",
    "read_metadata",
    "render",
]
