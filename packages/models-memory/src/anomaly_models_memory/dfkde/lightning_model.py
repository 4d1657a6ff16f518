"""DFKDE: kernel density estimation of PCA-reduced, globally pooled deep features.

Deep feature kernel density estimation, the image-level baseline of Intel's Anomalib family
(Akcay et al. (2022), "Anomalib: A Deep Learning Library for Anomaly Detection",
https://arxiv.org/abs/2202.08341), built on the deep-feature density modelling of Ahuja et al.
(2019), https://arxiv.org/abs/1909.11786, with Gaussian kernel density estimation (Parzen
1962) and Scott's bandwidth rule (Scott 1992).

One pass over the good training images collects each image's feature vector: every chosen
level of a pretrained backbone averaged over all positions, the levels concatenated. PCA fitted
on those vectors keeps ``n_pca_components`` axes; the reduced vectors are scaled (divided by the
longest training vector, or each to unit length) and a Gaussian KDE with full-covariance kernels
(Scott's rule, as ``scipy.stats.gaussian_kde``) is fitted to at most ``max_training_points`` of
them. A test image scores the negative log density of its vector.

The method is image-level, so its default anomaly map (``anomaly_map_mode="constant"``) is the
image score at every pixel: it says how anomalous the image is, not where. The alternative,
``anomaly_map_mode="occlusion"``, is a coarse attribution of that same score: the image is cut
into the cells of the coarsest chosen level, and each cell's value is how much the score drops
when the cell is left out of the average pooling (one density evaluation per cell). It points
at the cells that make the image unusual, at the resolution of the coarsest level (32 px cells
at stride 32), but on MTD's small defects it localizes weakly: pixel AUROC 0.62 against 0.78
for the constant map, 0.58 within defective images. A per-position density under the
image-level KDE is not offered: single positions do not follow the distribution of image
averages the KDE was fitted to.

Deliberate differences from the reference implementation:

- Backbone: ``efficientnet_lite0`` (stride-32 level, 320 channels) with offline weights instead
  of ResNet-18's layer4, for CPU speed and no download.
- PCA is fitted on every training vector; only the KDE centres are subsampled to
  ``max_training_points``. The number of components is capped by the rank of the training set
  (fewer images than components otherwise give a singular kernel).
- Densities are summed as log-sum-exp, so far-away images get finite, ordered scores instead of
  a floored density.
- ``score_calibration="logistic"`` turns scores into probabilities with a logistic fitted by
  moments to the leave-one-out scores of the training images (its centre their mean), instead
  of a fixed logistic; it is monotone, so rankings and AUROC do not change.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from anomaly import AnomalyModule, Batch, ConfigError, LearningType
from anomaly_models_memory._common import (
    PcaAccumulator,
    check_choice,
    check_levels,
    gather_rows,
    world_size,
)
from anomaly_models_memory.dfkde.torch_model import (
    AnomalyMapMode,
    BandwidthRule,
    DfkdeNet,
    FeatureScaling,
    GaussianKde,
    ScoreCalibration,
    fit_gaussian_kde,
    kde_log_density,
)

__all__ = ["Dfkde"]

logger = logging.getLogger(__name__)

# Training vectors scored leave-one-out to fit the logistic calibration.
_CALIBRATION_POINTS = 2000


class Dfkde(AnomalyModule):
    """DFKDE anomaly detection (kernel density of pooled deep features, one pass).

    Args:
        backbone: timm model name with offline weights (see ``anomaly.backbones``).
        strides: Feature levels by stride, each average-pooled over the whole image.
        out_indices: timm feature indices, used instead of ``strides`` when given.
        pretrained_weights: Local weight file for the backbone; default: its weight provider.
        pretrained: Load pretrained backbone weights (False: random, only for experiments).
        n_pca_components: PCA components kept (at most the training set's rank).
        feature_scaling_method: ``scale`` (divide by the longest training vector) or ``norm``
            (every vector to unit length), applied after PCA.
        max_training_points: Most training vectors kept as kernel centres (seeded subsample).
        bandwidth: ``scott``, ``silverman``, or a positive factor multiplying the data's
            standard deviations.
        score_calibration: ``none`` (negative log density) or ``logistic`` (probability).
        anomaly_map_mode: ``constant`` (the score everywhere) or ``occlusion`` (see the module
            docstring).
        sigma: Gaussian smoothing of the anomaly map in pixels; 0 turns it off.
        seed: Seed of the subsampling.
        backbone_runtime: How the frozen backbone runs: ``"eager"``, ``"channels_last"``,
            ``"compile"`` or ``"openvino"`` (the fastest on CPUs; needs the openvino package);
            see ``anomaly.backbones.BackboneRuntime``. Scores are the same up to rounding.
    """

    learning_type: ClassVar[LearningType] = LearningType.ONE_CLASS
    # One pass over the training set; no sanity validation, which would score unfitted.
    trainer_arguments: ClassVar[dict[str, Any]] = {"max_epochs": 1, "num_sanity_val_steps": 0}

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        strides: Sequence[int] | None = (32,),
        out_indices: Sequence[int] | None = None,
        pretrained_weights: str | os.PathLike[str] | None = None,
        pretrained: bool = True,
        n_pca_components: int = 16,
        feature_scaling_method: str = "scale",
        max_training_points: int = 40000,
        bandwidth: str | float = "scott",
        score_calibration: str = "none",
        anomaly_map_mode: str = "constant",
        sigma: float = 4.0,
        seed: int = 0,
        backbone_runtime: str = "eager",
    ) -> None:
        super().__init__()
        for name, value, minimum in (
            ("n_pca_components", n_pca_components, 1),
            ("max_training_points", max_training_points, 2),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                msg = f"{name} must be an int >= {minimum}, got {value!r}"
                raise ConfigError(msg)
        scaling = check_choice("feature_scaling_method", feature_scaling_method, FeatureScaling)
        calibration = check_choice("score_calibration", score_calibration, ScoreCalibration)
        map_mode = check_choice("anomaly_map_mode", anomaly_map_mode, AnomalyMapMode)
        self.bandwidth = _check_bandwidth(bandwidth)
        if isinstance(sigma, bool) or not isinstance(sigma, int | float) or sigma < 0:
            msg = f"sigma must be >= 0 pixels, got {sigma!r}; e.g. 4"
            raise ConfigError(msg)
        if isinstance(seed, bool) or not isinstance(seed, int):
            msg = f"seed must be an int, got {seed!r}"
            raise ConfigError(msg)
        strides = check_levels("strides", strides)
        out_indices = check_levels("out_indices", out_indices, minimum=0)
        self.save_hyperparameters()
        self.n_pca_components = n_pca_components
        self.max_training_points = max_training_points
        self.score_calibration = calibration
        self.seed = seed
        self.model = DfkdeNet(
            backbone,
            strides,
            out_indices=out_indices,
            pretrained=pretrained,
            pretrained_weights=pretrained_weights,
            n_components=n_pca_components,
            feature_scaling=scaling,
            map_mode=map_mode,
            sigma=sigma,
            backbone_runtime=backbone_runtime,
        )
        self._vectors: list[torch.Tensor] = []

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return raw ``(pred_score (B,), anomaly_map (B, H, W))`` for images in [0, 1]."""
        return self.model(image)  # type: ignore[no-any-return]  # nn.Module.__call__ is untyped

    def on_train_epoch_start(self) -> None:
        """Start collecting feature vectors afresh (and mark that ``fit_end`` must run)."""
        super().on_train_epoch_start()
        self._vectors = []

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        """Collect the pooled feature vectors of a batch of good images; there is no loss."""
        self.collect(batch.image)

    def collect(self, image: torch.Tensor) -> None:
        """Add the feature vectors of ``image`` ((B, 3, H, W) float in [0, 1]) to the pool."""
        with torch.no_grad():
            vectors = self.model.embed(image)
        self._vectors.append(vectors.detach().float().cpu())

    def fit_end(self) -> None:
        """Fit the PCA and the kernel density to the collected vectors."""
        if not self._vectors:
            msg = "DFKDE saw no training images; give the datamodule a non-empty train split"
            raise ConfigError(msg)
        vectors = torch.cat(self._vectors)
        self._vectors = []
        if world_size() > 1:  # data-parallel fitting: every process fits the same density
            vectors = gather_rows(vectors.to(self.device)).cpu()
        self.fit_density(vectors)

    def fit_density(self, vectors: torch.Tensor) -> None:
        """Fit the PCA and the kernel density to pooled feature vectors.

        Args:
            vectors: (N, D) float, N >= 2, as ``DfkdeNet.embed`` returns them.
        """
        vectors = vectors.detach().cpu().double()
        count = vectors.shape[0]
        if count < 2:
            msg = f"DFKDE needs at least 2 training images, got {count}; add good images"
            raise ConfigError(msg)
        # The accumulator decomposes the smaller of the Gram and covariance matrices.
        pca = PcaAccumulator(vectors.shape[1])
        pca.update(vectors)
        mean, components, _, _ = pca.compute(n_components=self.n_pca_components)
        if components.shape[0] < self.n_pca_components:
            logger.warning(
                "DFKDE keeps %d PCA components instead of %d: %d training images span no more",
                components.shape[0],
                self.n_pca_components,
                count,
            )
        if count > self.max_training_points:
            generator = torch.Generator().manual_seed(self.seed)
            keep = torch.randperm(count, generator=generator)[: self.max_training_points]
            vectors = vectors[keep.sort().values]
        reduced = (vectors - mean) @ components.T
        lengths = torch.linalg.vector_norm(reduced, dim=1)
        if self.model.feature_scaling is FeatureScaling.NORM:
            points = reduced / lengths.clamp_min(1e-12).unsqueeze(1)
            max_length = 1.0
        else:
            max_length = max(float(lengths.max()), 1e-12)
            points = reduced / max_length
        kde = fit_gaussian_kde(points, self.bandwidth)
        calibration = None
        if self.score_calibration is ScoreCalibration.LOGISTIC:
            calibration = _logistic_calibration(kde, points, self.seed)
        self.model.set_density(mean, components, max_length, kde, calibration)
        logger.info(
            "DFKDE density: %d kernel centres of %d training images, %d PCA components",
            points.shape[0],
            count,
            points.shape[1],
        )


def _check_bandwidth(bandwidth: object) -> BandwidthRule | float:
    if isinstance(bandwidth, int | float) and not isinstance(bandwidth, bool):
        if not bandwidth > 0 or math.isinf(bandwidth):
            msg = f"bandwidth must be 'scott', 'silverman' or a positive number, got {bandwidth!r}"
            raise ConfigError(msg)
        return float(bandwidth)
    return check_choice("bandwidth", bandwidth, BandwidthRule)


def _logistic_calibration(kde: GaussianKde, points: torch.Tensor, seed: int) -> tuple[float, float]:
    """Return the (centre, scale) of a logistic with the mean and variance of normal scores.

    Scores are the leave-one-out negative log densities of (a subsample of) the training
    points; a logistic distribution of scale ``s`` has variance ``s^2 pi^2 / 3``.
    """
    count = points.shape[0]
    rows = torch.arange(count)
    if count > _CALIBRATION_POINTS:
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randperm(count, generator=generator)[:_CALIBRATION_POINTS].sort().values
    # Move the scored rows first so that ``exclude_self`` leaves out their own centres.
    rest = torch.ones(count, dtype=torch.bool)
    rest[rows] = False
    order = torch.cat([rows, torch.nonzero(rest).flatten()])
    scores = -kde_log_density(
        points[rows], kde.whitening, kde.centres[order], kde.log_norm, exclude_self=True
    )
    centre = float(scores.mean())
    spread = float(scores.std()) if scores.numel() > 1 else 0.0
    # Equal scores (n = d + 1 points are equidistant once whitened) would make a step function.
    scale = max(spread * math.sqrt(3.0) / math.pi, 1e-3)
    return centre, scale
