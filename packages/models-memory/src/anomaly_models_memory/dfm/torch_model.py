"""DFM's maths as a plain ``nn.Module``: pooled deep features, PCA, reconstruction error."""

from __future__ import annotations

import enum
import logging
import math
import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from anomaly import DataError
from anomaly.backbones import FeatureExtractor, imagenet_normalize
from anomaly_models_memory._common import GaussianBlur2d, NotFittedError

if TYPE_CHECKING:
    from anomaly import PluginManager

__all__ = ["DfmNet", "DfmScore"]

logger = logging.getLogger(__name__)


class DfmScore(enum.StrEnum):
    """DFM's image score."""

    FRE = "fre"  # feature reconstruction error ||x - PCA^-1(PCA(x))||^2
    NLL = "nll"  # Gaussian negative log-likelihood in PCA space


class DfmNet(nn.Module):
    """Score images by how well a PCA of normal deep features explains theirs.

    The feature map of one backbone level is average-pooled by ``pooling_kernel_size`` and
    flattened into one vector per image (channels times pooled positions). The fitted state
    (mean, principal axes and their variances) lives in buffers that are empty until
    ``set_pca`` (the Lightning module's ``fit_end``) or ``load_state_dict``; the vector's length
    depends on the image size, so test images must have the training size.

    Args:
        backbone: timm model name.
        stride: The feature level, by stride.
        pretrained: Load pretrained weights (see ``anomaly.backbones.FeatureExtractor``).
        pretrained_weights: Local weight file for the backbone.
        pooling_kernel_size: Side (and stride) of the average pooling; 1 turns it off.
        score_type: ``fre`` or ``nll`` (see ``DfmScore``).
        sigma: Gaussian smoothing of the anomaly map, in input pixels; 0 turns it off.
        plugin_manager: Where to look up backbone weight providers.
        backbone_runtime: How the frozen backbone runs (``FeatureExtractor``'s ``runtime``).
    """

    mean: torch.Tensor
    components: torch.Tensor
    variances: torch.Tensor

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        stride: int = 16,
        *,
        pretrained: bool = True,
        pretrained_weights: str | os.PathLike[str] | None = None,
        pooling_kernel_size: int = 4,
        score_type: DfmScore | str = DfmScore.FRE,
        sigma: float = 4.0,
        plugin_manager: PluginManager | None = None,
        backbone_runtime: str = "eager",
    ) -> None:
        super().__init__()
        self.feature_extractor = FeatureExtractor(
            backbone,
            [stride],
            pretrained=pretrained,
            pretrained_weights=pretrained_weights,
            plugin_manager=plugin_manager,
            runtime=backbone_runtime,
        )
        self.channels = self.feature_extractor.channels[0]
        self.pooling_kernel_size = pooling_kernel_size
        self.score_type = DfmScore(score_type)
        self.blur = GaussianBlur2d(sigma)
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("components", torch.empty(0, 0))
        self.register_buffer("variances", torch.empty(0))

    @property
    def fitted(self) -> bool:
        """Whether the PCA is set."""
        return self.components.shape[0] > 0

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """Return pooled feature maps.

        Args:
            image: (B, 3, H, W) float in [0, 1].

        Returns:
            (B, C, h, w) float32: the level's map average-pooled by ``pooling_kernel_size``.

        Raises:
            DataError: When the feature map is smaller than the pooling kernel.
        """
        feature: torch.Tensor = self.feature_extractor(imagenet_normalize(image))[0]
        kernel = self.pooling_kernel_size
        if kernel > 1:
            if min(feature.shape[-2:]) < kernel:
                msg = (
                    f"images of size {tuple(image.shape[-2:])} give {tuple(feature.shape[-2:])} "
                    f"feature maps, smaller than pooling_kernel_size {kernel}; use larger "
                    f"images or a smaller pooling_kernel_size"
                )
                raise DataError(msg)
            feature = F.avg_pool2d(feature, kernel)
        return feature

    def set_pca(
        self, mean: torch.Tensor, components: torch.Tensor, variances: torch.Tensor
    ) -> None:
        """Set the PCA: ``mean`` (D,), orthonormal ``components`` (k, D), ``variances`` (k,)."""
        if (
            mean.ndim != 1
            or mean.shape[0] % self.channels != 0
            or components.shape[1:] != mean.shape
            or variances.shape != components.shape[:1]
            or components.shape[0] < 1
        ):
            msg = (
                f"PCA of shapes {tuple(mean.shape)}, {tuple(components.shape)} and "
                f"{tuple(variances.shape)} does not fit features of {self.channels} channels"
            )
            raise ValueError(msg)
        device = self.mean.device
        self.mean = mean.detach().to(device, torch.float32).contiguous()
        self.components = components.detach().to(device, torch.float32).contiguous()
        self.variances = variances.detach().to(device, torch.float32).contiguous()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score images.

        Args:
            image: (B, 3, H, W) float in [0, 1], of the size the model was fitted on.

        Returns:
            ``(pred_score (B,), anomaly_map (B, H, W))``: the feature reconstruction error (or
            the negative log-likelihood) of each image, and the reconstruction error of each
            pooled position, bilinearly upsampled and smoothed.

        Raises:
            NotFittedError: When the PCA is empty.
            DataError: When the image size differs from the training size.
        """
        if not self.fitted:
            msg = "DFM's PCA is empty; fit the model or load a fitted checkpoint"
            raise NotFittedError(msg)
        pooled = self.embed(image)
        batch, channels, height, width = pooled.shape
        features = pooled.reshape(batch, -1)
        if features.shape[1] != self.mean.shape[0]:
            positions = self.mean.shape[0] // self.channels
            msg = (
                f"DFM was fitted on {positions} pooled positions per image but images of size "
                f"{tuple(image.shape[-2:])} give {height * width}; resize test images to the "
                f"training size"
            )
            raise DataError(msg)
        centered = features - self.mean
        projected = centered @ self.components.T  # (B, k)
        residual = centered - projected @ self.components
        squared = (residual * residual).reshape(batch, channels, height, width).sum(dim=1)
        if self.score_type is DfmScore.FRE:
            score = squared.flatten(1).sum(dim=1)
        else:
            # -log N(z; 0, diag(lambda)), z the coordinates along the principal axes.
            variances = self.variances.clamp_min(1e-12)
            log_norm = 0.5 * (
                torch.log(variances).sum() + variances.numel() * math.log(2 * math.pi)
            )
            score = 0.5 * (projected * projected / variances).sum(dim=1) + log_norm
        anomaly_map = F.interpolate(
            squared.unsqueeze(1), size=image.shape[-2:], mode="bilinear", align_corners=False
        )
        return score, self.blur(anomaly_map.squeeze(1))
