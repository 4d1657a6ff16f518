"""PaDiM: a multivariate Gaussian of pretrained features at every image position.

Defard, Setkov, Loesch, Audigier (2021), "PaDiM: a Patch Distribution Modeling Framework for
Anomaly Detection and Localization", ICPR workshops, https://arxiv.org/abs/2011.08785.

One pass over the good training images fits, at every position of the finest feature map,
the mean and covariance (plus 0.01 I) of the concatenated multi-level embeddings, reduced to a
random subset of channels. A test position scores its Mahalanobis distance; the map is
upsampled and Gaussian-smoothed, and the image score is its maximum.

Deliberate differences from the paper:

- Backbone: ``efficientnet_lite0`` (strides 4, 8, 16: 24 + 40 + 112 = 176 channels) with offline
  weights instead of ResNet-18 / WideResNet-50, for CPU speed and no download; 100 random
  channels are kept, as the paper does for ResNet-18.
- Statistics are accumulated as running sums of embeddings and their outer products (in
  float64) rather than by storing every training embedding, so memory does not grow with
  the training set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from anomaly import AnomalyModule, Batch, ConfigError, LearningType
from anomaly_models_memory._common import check_levels, world_size
from anomaly_models_memory.padim.torch_model import GaussianAccumulator, PadimNet

__all__ = ["Padim"]

logger = logging.getLogger(__name__)


class Padim(AnomalyModule):
    """PaDiM anomaly detection and localization (per-position Gaussians, one pass).

    Args:
        backbone: timm model name with offline weights (see ``anomaly.backbones``).
        strides: Feature levels by stride, finest first, e.g. ``[4, 8, 16]``.
        out_indices: timm feature indices, used instead of ``strides`` when given.
        pretrained_weights: Local weight file for the backbone; default: its weight provider.
        pretrained: Load pretrained backbone weights (False: random, only for experiments).
        n_features: Channels kept by seeded random selection; None keeps all.
        epsilon: Regularization added to each covariance's diagonal.
        sigma: Gaussian smoothing of the anomaly map in pixels; 0 turns it off.
        seed: Seed of the channel selection.
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
        strides: Sequence[int] | None = (4, 8, 16),
        out_indices: Sequence[int] | None = None,
        pretrained_weights: str | os.PathLike[str] | None = None,
        pretrained: bool = True,
        n_features: int | None = 100,
        epsilon: float = 0.01,
        sigma: float = 4.0,
        seed: int = 0,
        backbone_runtime: str = "eager",
    ) -> None:
        super().__init__()
        if n_features is not None and (not isinstance(n_features, int) or n_features < 1):
            msg = f"n_features must be a positive int or None, got {n_features!r}; e.g. 100"
            raise ConfigError(msg)
        if not isinstance(epsilon, int | float) or epsilon <= 0:
            msg = f"epsilon must be > 0, got {epsilon!r}; the paper uses 0.01"
            raise ConfigError(msg)
        if not isinstance(sigma, int | float) or sigma < 0:
            msg = f"sigma must be >= 0 pixels, got {sigma!r}; e.g. 4"
            raise ConfigError(msg)
        strides = check_levels("strides", strides)
        out_indices = check_levels("out_indices", out_indices, minimum=0)
        self.save_hyperparameters()
        self.epsilon = float(epsilon)
        self.model = PadimNet(
            backbone,
            strides,
            out_indices=out_indices,
            pretrained=pretrained,
            pretrained_weights=pretrained_weights,
            n_features=n_features,
            sigma=sigma,
            seed=seed,
            backbone_runtime=backbone_runtime,
        )
        self._accumulator: GaussianAccumulator | None = None
        self._grid: tuple[int, int] | None = None

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return raw ``(pred_score (B,), anomaly_map (B, H, W))`` for images in [0, 1]."""
        return self.model(image)  # type: ignore[no-any-return]  # nn.Module.__call__ is untyped

    def on_train_epoch_start(self) -> None:
        """Start accumulating statistics afresh (and mark that ``fit_end`` must run)."""
        super().on_train_epoch_start()
        self._accumulator = None
        self._grid = None

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        """Accumulate the statistics of a batch of good images; there is no loss."""
        self.collect(batch.image)

    def collect(self, image: torch.Tensor) -> None:
        """Add the embeddings of ``image`` ((B, 3, H, W) float in [0, 1]) to the statistics."""
        with torch.no_grad():
            embedding = self.model.embed(image)
        batch, features, height, width = embedding.shape
        if self._accumulator is None or self._grid is None:
            self._accumulator = GaussianAccumulator(height * width, features, embedding.device)
            self._grid = (height, width)
        elif self._grid != (height, width):
            msg = (
                f"PaDiM needs training images of one size, but feature maps of {self._grid} "
                f"and {(height, width)} were seen; resize the images to one size"
            )
            raise ConfigError(msg)
        flat = embedding.reshape(batch, features, height * width).transpose(1, 2)
        self._accumulator.update(flat)

    def fit_end(self) -> None:
        """Turn the accumulated sums into per-position means and inverse covariances."""
        if self._accumulator is None or self._grid is None:
            msg = "PaDiM saw no training images; give the datamodule a non-empty train split"
            raise ConfigError(msg)
        if world_size() > 1:  # data-parallel fitting: every process gets the same statistics
            self._accumulator.all_reduce()
        mean, inverse = self._accumulator.compute(self.epsilon)
        height, width = self._grid
        self.model.set_gaussian(mean.T.reshape(-1, height, width), inverse)
        logger.info(
            "PaDiM statistics: %d images, %dx%d positions, %d features",
            self._accumulator.count,
            height,
            width,
            mean.shape[1],
        )
        self._accumulator = None
