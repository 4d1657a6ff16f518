"""DFKDE's maths as a plain ``nn.Module``: pooled features, PCA, Gaussian kernel density."""

from __future__ import annotations

import enum
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from anomaly import ConfigError
from anomaly.backbones import FeatureExtractor, imagenet_normalize
from anomaly_models_memory._common import GaussianBlur2d, NotFittedError

if TYPE_CHECKING:
    from anomaly import PluginManager

__all__ = [
    "AnomalyMapMode",
    "BandwidthRule",
    "DfkdeNet",
    "FeatureScaling",
    "GaussianKde",
    "ScoreCalibration",
    "bandwidth_factor",
    "fit_gaussian_kde",
    "kde_log_density",
]

logger = logging.getLogger(__name__)

# Kernel centres per block of the density sums: bounds memory to 16 KiB per query row.
_CENTRE_BLOCK = 4096


class FeatureScaling(enum.StrEnum):
    """How PCA-reduced features are scaled before the density estimate."""

    NORM = "norm"  # every vector to unit length
    SCALE = "scale"  # every vector divided by the longest training vector


class BandwidthRule(enum.StrEnum):
    """Rule of thumb for the kernel bandwidth factor."""

    SCOTT = "scott"  # n ** (-1 / (d + 4))
    SILVERMAN = "silverman"  # (n (d + 2) / 4) ** (-1 / (d + 4))


class ScoreCalibration(enum.StrEnum):
    """How DFKDE reports image scores."""

    NONE = "none"  # negative log density
    LOGISTIC = "logistic"  # probability from a logistic fitted to the normal training scores


class AnomalyMapMode(enum.StrEnum):
    """What DFKDE's image-level density gives as an anomaly map."""

    OCCLUSION = "occlusion"  # score drop when one coarse cell is left out of the pooling
    CONSTANT = "constant"  # the image score everywhere


def bandwidth_factor(rule: BandwidthRule | float, count: int, dimensions: int) -> float:
    """Return the factor the data covariance is scaled by (squared) to give the kernel's.

    Args:
        rule: ``scott``, ``silverman`` or a positive number used as is.
        count: Number of kernel centres n.
        dimensions: Dimensions d of the data.
    """
    if isinstance(rule, BandwidthRule):
        if rule is BandwidthRule.SCOTT:
            return float(count ** (-1.0 / (dimensions + 4)))
        return float((count * (dimensions + 2) / 4.0) ** (-1.0 / (dimensions + 4)))
    return float(rule)


@dataclass(frozen=True, slots=True)
class GaussianKde:
    """A fitted Gaussian kernel density in whitened coordinates.

    The kernel covariance is ``H = factor^2 * Sigma`` (Sigma the data covariance, as in
    ``scipy.stats.gaussian_kde``). With ``H = L L^T`` and ``W = L^-1``, the kernel's Mahalanobis
    distance is the Euclidean distance after ``x -> W x``, so the centres are stored whitened.

    Attributes:
        whitening: (d, d) ``W``, lower triangular.
        centres: (n, d) whitened kernel centres ``W x_i``.
        log_norm: ``-log n - log det(2 pi H) / 2``, the log of each kernel's weight and
            normalizer.
    """

    whitening: torch.Tensor
    centres: torch.Tensor
    log_norm: float


def fit_gaussian_kde(
    points: torch.Tensor, rule: BandwidthRule | float = BandwidthRule.SCOTT
) -> GaussianKde:
    """Fit a Gaussian KDE with full-covariance kernels to ``points``: (n, d), n >= 2.

    A covariance of lower rank than d (fewer points than dimensions plus one) gets a ridge of
    ``1e-6`` of its mean variance so that the kernel stays a proper density.

    Returns:
        The density, in the dtype of ``points`` (use float64 for the fit).
    """
    count, dimensions = points.shape
    if count < 2:
        msg = f"a kernel density needs at least 2 training points, got {count}"
        raise ConfigError(msg)
    covariance = torch.cov(points.T).reshape(dimensions, dimensions)
    ridge = 1e-6 * float(covariance.diagonal().mean().clamp_min(1e-12))
    identity = torch.eye(dimensions, dtype=points.dtype, device=points.device)
    factor = bandwidth_factor(rule, count, dimensions)
    kernel = factor**2 * covariance
    cholesky, info = torch.linalg.cholesky_ex(kernel)
    if int(info) != 0:  # rank-deficient: add the ridge (only then, to match scipy otherwise)
        cholesky = torch.linalg.cholesky(kernel + factor**2 * ridge * identity)
    whitening = torch.linalg.solve_triangular(cholesky, identity, upper=False)
    log_det = 2.0 * float(torch.log(cholesky.diagonal()).sum())
    log_norm = -math.log(count) - 0.5 * (dimensions * math.log(2 * math.pi) + log_det)
    return GaussianKde(whitening, points @ whitening.T, log_norm)


def kde_log_density(
    query: torch.Tensor,
    whitening: torch.Tensor,
    centres: torch.Tensor,
    log_norm: torch.Tensor | float,
    exclude_self: bool = False,
) -> torch.Tensor:
    """Return the log density of a Gaussian KDE at each query row.

    ``log p(x) = log_norm + logsumexp_i(-||W x - c_i||^2 / 2)``; the log-sum-exp never
    underflows, however far a query lies from the centres.

    Args:
        query: (m, d).
        whitening: (d, d) ``W``.
        centres: (n, d) whitened centres.
        log_norm: See ``GaussianKde``.
        exclude_self: Leave out centre ``i`` for query row ``i``, ``m <= n`` (leave-one-out
            density of training points; ``log_norm`` is corrected to ``n - 1`` centres).

    Returns:
        (m,) log densities.
    """
    whitened = query @ whitening.T
    query_norms = (whitened * whitened).sum(dim=1, keepdim=True)
    total = centres.shape[0]
    log_density: torch.Tensor | None = None
    # Blocks of centres, not of queries: their count is fixed by the fitted state, so an exported
    # graph keeps a dynamic batch size; blocks combine with log-add-exp.
    for start in range(0, total, _CENTRE_BLOCK):
        block = centres[start : start + _CENTRE_BLOCK]
        # ||a - b||^2 = ||a||^2 - 2 a.b + ||b||^2: one matrix product per block.
        squared = query_norms - 2.0 * whitened @ block.T + (block * block).sum(dim=1)
        squared = squared.clamp_min(0.0)
        if exclude_self:
            rows = torch.arange(start, min(start + block.shape[0], query.shape[0]))
            squared[rows, rows - start] = math.inf
        part = torch.logsumexp(-0.5 * squared, dim=1)
        log_density = part if log_density is None else torch.logaddexp(log_density, part)
    if log_density is None:
        msg = "the kernel density has no centres; fit it first"
        raise ValueError(msg)
    log_density = log_density + log_norm
    if exclude_self:
        log_density = log_density + math.log(total / (total - 1))
    return log_density


class DfkdeNet(nn.Module):
    """Score images by the kernel density of their pooled, PCA-reduced deep features.

    Each chosen feature level is averaged over all positions and the averages concatenated
    (the image's feature vector), then reduced by PCA, scaled, and scored by its negative log
    density under a Gaussian KDE of the training images' vectors. The fitted state lives in
    buffers that are empty until ``set_density`` (the Lightning module's ``fit_end``) or
    ``load_state_dict``.

    Anomaly maps are the score at every pixel (``map_mode="constant"``) or, with
    ``map_mode="occlusion"``, an attribution of it: the image is cut into the cells of the
    coarsest chosen level; for each cell, the feature vector the image would have without it
    (every level's average over the other cells) is scored, and the map holds how much the
    score drops by leaving the cell out. A cell that makes the image look anomalous has a large
    positive value. Cells are the coarsest grid, so maps are coarse (32 px at stride 32).

    Args:
        backbone: timm model name.
        strides: Feature levels by stride.
        out_indices: timm feature indices, used instead of ``strides`` when given.
        pretrained: Load pretrained weights (see ``anomaly.backbones.FeatureExtractor``).
        pretrained_weights: Local weight file for the backbone.
        n_components: PCA components kept (fewer when the training set has lower rank).
        feature_scaling: ``norm`` or ``scale`` (see ``FeatureScaling``).
        map_mode: ``constant`` or ``occlusion`` (see ``AnomalyMapMode``).
        sigma: Gaussian smoothing of the anomaly map, in input pixels; 0 turns it off.
        plugin_manager: Where to look up backbone weight providers.
        backbone_runtime: How the frozen backbone runs (``FeatureExtractor``'s ``runtime``).
    """

    pca_mean: torch.Tensor
    pca_components: torch.Tensor
    max_length: torch.Tensor
    whitening: torch.Tensor
    centres: torch.Tensor
    log_norm: torch.Tensor
    calibration: torch.Tensor

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        strides: Sequence[int] | None = (32,),
        *,
        out_indices: Sequence[int] | None = None,
        pretrained: bool = True,
        pretrained_weights: str | os.PathLike[str] | None = None,
        n_components: int = 16,
        feature_scaling: FeatureScaling | str = FeatureScaling.SCALE,
        map_mode: AnomalyMapMode | str = AnomalyMapMode.CONSTANT,
        sigma: float = 4.0,
        plugin_manager: PluginManager | None = None,
        backbone_runtime: str = "eager",
    ) -> None:
        super().__init__()
        self.feature_extractor = FeatureExtractor(
            backbone,
            strides,
            out_indices=out_indices,
            pretrained=pretrained,
            pretrained_weights=pretrained_weights,
            plugin_manager=plugin_manager,
            runtime=backbone_runtime,
        )
        self.n_features = sum(self.feature_extractor.channels)
        self.n_components = n_components
        self.feature_scaling = FeatureScaling(feature_scaling)
        self.map_mode = AnomalyMapMode(map_mode)
        self.blur = GaussianBlur2d(sigma)
        self.register_buffer("pca_mean", torch.empty(0))
        self.register_buffer("pca_components", torch.empty(0, self.n_features))
        self.register_buffer("max_length", torch.ones(()))
        self.register_buffer("whitening", torch.empty(0, 0))
        self.register_buffer("centres", torch.empty(0, 0))
        self.register_buffer("log_norm", torch.zeros(()))
        # (centre, scale) of the logistic that turns scores into probabilities; empty: raw
        # negative log densities are returned.
        self.register_buffer("calibration", torch.empty(0))

    @property
    def fitted(self) -> bool:
        """Whether the density is set."""
        return self.centres.shape[0] > 0

    def level_features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Return the chosen feature maps of images in [0, 1]: one (B, C_i, h_i, w_i) each."""
        return self.feature_extractor(imagenet_normalize(image))  # type: ignore[no-any-return]  # nn.Module.__call__ is untyped

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """Return the pooled feature vectors: (B, sum C_i) float32, for images in [0, 1]."""
        return torch.cat([feature.mean(dim=(2, 3)) for feature in self.level_features(image)], 1)

    def reduce(self, vectors: torch.Tensor) -> torch.Tensor:
        """Project (m, D) pooled vectors on the principal axes and scale them: (m, k)."""
        reduced: torch.Tensor = (vectors - self.pca_mean) @ self.pca_components.T
        if self.feature_scaling is FeatureScaling.NORM:
            length: torch.Tensor = torch.linalg.vector_norm(reduced, dim=1, keepdim=True)
            return reduced / length.clamp_min(1e-12)
        return reduced / self.max_length

    def negative_log_density(self, vectors: torch.Tensor) -> torch.Tensor:
        """Return the negative log density of (m, D) pooled vectors: (m,)."""
        return -kde_log_density(self.reduce(vectors), self.whitening, self.centres, self.log_norm)

    def set_density(
        self,
        pca_mean: torch.Tensor,
        pca_components: torch.Tensor,
        max_length: float,
        kde: GaussianKde,
        calibration: tuple[float, float] | None = None,
    ) -> None:
        """Set the fitted state: PCA (``(D,)``, ``(k, D)``), scale, KDE, optional calibration."""
        if pca_mean.shape != (self.n_features,) or pca_components.shape[1:] != (self.n_features,):
            msg = (
                f"PCA of shapes {tuple(pca_mean.shape)} and {tuple(pca_components.shape)} does "
                f"not fit {self.n_features} features"
            )
            raise ValueError(msg)
        device = self.centres.device

        def put(value: torch.Tensor) -> torch.Tensor:
            return value.detach().to(device, torch.float32).contiguous()

        self.pca_mean = put(pca_mean)
        self.pca_components = put(pca_components)
        self.max_length = torch.tensor(float(max_length), device=device)
        self.whitening = put(kde.whitening)
        self.centres = put(kde.centres)
        self.log_norm = torch.tensor(float(kde.log_norm), device=device)
        self.calibration = (
            torch.tensor(calibration, dtype=torch.float32, device=device)
            if calibration is not None
            else torch.empty(0, device=device)
        )

    def occlusion_map(self, features: list[torch.Tensor], score: torch.Tensor) -> torch.Tensor:
        """Return how much leaving each coarse cell out lowers the score: (B, h_c, w_c)."""
        height = min(int(feature.shape[-2]) for feature in features)
        width = min(int(feature.shape[-1]) for feature in features)
        cells = height * width
        batch = score.shape[0]
        if cells == 1:
            return torch.zeros(batch, 1, 1, dtype=score.dtype, device=score.device)
        left_out = []
        for feature in features:
            # Cell means; with equal cells the image mean is their mean, so leaving cell c out
            # gives (cells * mean - cell_c) / (cells - 1).
            cell = F.adaptive_avg_pool2d(feature, (height, width)).flatten(2)  # (B, C_i, P)
            whole = feature.mean(dim=(2, 3)).unsqueeze(2)
            left_out.append((cells * whole - cell) / (cells - 1))
        vectors = torch.cat(left_out, dim=1).transpose(1, 2).reshape(batch * cells, -1)
        without = self.negative_log_density(vectors).reshape(batch, height, width)
        return score.reshape(batch, 1, 1) - without

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score images.

        Args:
            image: (B, 3, H, W) float in [0, 1], any size the backbone accepts.

        Returns:
            ``(pred_score (B,), anomaly_map (B, H, W))``: the negative log density of each
            image's features (or its calibrated probability in [0, 1] when calibrated), and
            the occlusion map in score units (or the score everywhere, ``map_mode="constant"``).

        Raises:
            NotFittedError: When the density is not set.
        """
        if not self.fitted:
            msg = "DFKDE's density is empty; fit the model or load a fitted checkpoint"
            raise NotFittedError(msg)
        features = self.level_features(image)
        vectors = torch.cat([feature.mean(dim=(2, 3)) for feature in features], dim=1)
        raw = self.negative_log_density(vectors)
        if self.map_mode is AnomalyMapMode.OCCLUSION:
            coarse = self.occlusion_map(features, raw)
            anomaly_map = F.interpolate(
                coarse.unsqueeze(1), size=image.shape[-2:], mode="bilinear", align_corners=False
            )
            anomaly_map = self.blur(anomaly_map.squeeze(1))
        else:
            anomaly_map = raw.reshape(-1, 1, 1).expand(-1, *image.shape[-2:]).contiguous()
        score = raw
        if self.calibration.shape[0] == 2:
            score = torch.sigmoid((raw - self.calibration[0]) / self.calibration[1])
        return score, anomaly_map
