"""DFM: PCA of pooled deep features, scored by reconstruction error or Gaussian likelihood.

Ahuja, Ndiour, Kalyanpur, Tickoo (2019), "Probabilistic Modeling of Deep Features for
Out-of-Distribution and Adversarial Detection", NeurIPS workshops,
https://arxiv.org/abs/1909.11786; used for anomaly detection and localization as "deep feature
modeling" (DFM) in Intel's Anomalib (Akcay et al. 2022, https://arxiv.org/abs/2202.08341).

One pass over the good training images accumulates the mean and covariance of each image's
feature vector: one level of a pretrained backbone, average-pooled by
``pooling_kernel_size`` and flattened (channels times pooled positions). PCA keeps the fewest
axes explaining ``pca_level`` of the variance. A test image scores either its feature
reconstruction error ``||x - PCA^-1(PCA(x))||^2`` (``fre``) or the Gaussian negative
log-likelihood of its coordinates along the kept axes, whose variances are the PCA's
eigenvalues (``nll``; the paper's class-conditional Gaussian with one class). The anomaly map
is the reconstruction error of each pooled position (summed over channels), bilinearly
upsampled and Gaussian-smoothed, whatever the score type.

Deliberate differences from the paper and its reference implementation:

- Backbone: ``efficientnet_lite0``'s stride-16 level (112 channels) with offline weights
  instead of ResNet-50's layer3, for CPU speed and no download.
- PCA runs on the cheaper of two matrices: while fewer training images than feature
  dimensions ``D`` have been seen, their vectors are kept and the (N, N) Gram matrix is
  decomposed; from ``D`` images on, only the float64 mean and covariance are accumulated and
  the (D, D) covariance is decomposed, so memory stays below ``D^2`` numbers however large the
  training set (``D`` = 1792 at 256 px).
- The anomaly map is Gaussian-smoothed (``sigma``), as the other memory models' maps are.
"""

from __future__ import annotations

import logging
import os
from typing import Any, ClassVar

import torch

from anomaly import AnomalyModule, Batch, ConfigError, LearningType
from anomaly_models_memory._common import PcaAccumulator, check_choice, world_size
from anomaly_models_memory.dfm.torch_model import DfmNet, DfmScore

__all__ = ["Dfm"]

logger = logging.getLogger(__name__)


class Dfm(AnomalyModule):
    """DFM anomaly detection and localization (PCA of deep features, one pass).

    Args:
        backbone: timm model name with offline weights (see ``anomaly.backbones``).
        stride: The feature level, by stride (16: the level ResNet's layer3 plays).
        pretrained_weights: Local weight file for the backbone; default: its weight provider.
        pretrained: Load pretrained backbone weights (False: random, only for experiments).
        pooling_kernel_size: Side (and stride) of the average pooling of the feature map.
        pca_level: Fraction of the training variance the kept principal axes explain, in
            (0, 1].
        score_type: ``fre`` (feature reconstruction error) or ``nll`` (Gaussian negative
            log-likelihood in PCA space).
        sigma: Gaussian smoothing of the anomaly map in pixels; 0 turns it off.
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
        stride: int = 16,
        pretrained_weights: str | os.PathLike[str] | None = None,
        pretrained: bool = True,
        pooling_kernel_size: int = 4,
        pca_level: float = 0.97,
        score_type: str = "fre",
        sigma: float = 4.0,
        backbone_runtime: str = "eager",
    ) -> None:
        super().__init__()
        for name, value in (("stride", stride), ("pooling_kernel_size", pooling_kernel_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"{name} must be a positive int, got {value!r}"
                raise ConfigError(msg)
        if (
            isinstance(pca_level, bool)
            or not isinstance(pca_level, int | float)
            or not 0.0 < pca_level <= 1.0
        ):
            msg = f"pca_level must lie in (0, 1] (a fraction of the variance), got {pca_level!r}"
            raise ConfigError(msg)
        score = check_choice("score_type", score_type, DfmScore)
        if isinstance(sigma, bool) or not isinstance(sigma, int | float) or sigma < 0:
            msg = f"sigma must be >= 0 pixels, got {sigma!r}; e.g. 4"
            raise ConfigError(msg)
        self.save_hyperparameters()
        self.pca_level = float(pca_level)
        self.model = DfmNet(
            backbone,
            stride,
            pretrained=pretrained,
            pretrained_weights=pretrained_weights,
            pooling_kernel_size=pooling_kernel_size,
            score_type=score,
            sigma=sigma,
            backbone_runtime=backbone_runtime,
        )
        self._pca: PcaAccumulator | None = None
        self._grid: tuple[int, int] | None = None

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return raw ``(pred_score (B,), anomaly_map (B, H, W))`` for images in [0, 1]."""
        return self.model(image)  # type: ignore[no-any-return]  # nn.Module.__call__ is untyped

    def on_train_epoch_start(self) -> None:
        """Start accumulating features afresh (and mark that ``fit_end`` must run)."""
        super().on_train_epoch_start()
        self._pca = None
        self._grid = None

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        """Accumulate the features of a batch of good images; there is no loss."""
        self.collect(batch.image)

    def collect(self, image: torch.Tensor) -> None:
        """Add the feature vectors of ``image`` ((B, 3, H, W) float in [0, 1]) to the PCA."""
        with torch.no_grad():
            pooled = self.model.embed(image)
        batch, channels, height, width = pooled.shape
        if self._pca is None or self._grid is None:
            self._pca = PcaAccumulator(channels * height * width, pooled.device)
            self._grid = (height, width)
        elif self._grid != (height, width):
            msg = (
                f"DFM needs training images of one size, but pooled feature maps of "
                f"{self._grid} and {(height, width)} were seen; resize the images to one size"
            )
            raise ConfigError(msg)
        self._pca.update(pooled.reshape(batch, -1))

    def fit_end(self) -> None:
        """Fit the PCA to the accumulated features."""
        if self._pca is None:
            msg = "DFM saw no training images; give the datamodule a non-empty train split"
            raise ConfigError(msg)
        if world_size() > 1:  # data-parallel fitting: every process gets the same PCA
            self._pca.all_reduce()
        count = self._pca.count
        if count < 2:
            msg = f"DFM needs at least 2 training images, got {count}; add good images"
            raise ConfigError(msg)
        mean, components, variances, total = self._pca.compute(level=self.pca_level)
        self._pca = None
        self.model.set_pca(mean, components, variances)
        logger.info(
            "DFM PCA: %d training images, %d of %d dimensions kept (%.3g of the variance)",
            count,
            components.shape[0],
            mean.shape[0],
            float(variances.sum()) / max(total, 1e-300),
        )
