"""PaDiM's maths as a plain ``nn.Module``: per-position Gaussians and Mahalanobis distances."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from anomaly import ConfigError, DataError
from anomaly.backbones import FeatureExtractor, imagenet_normalize
from anomaly_models_memory._common import GaussianBlur2d, NotFittedError, embedding_stack

if TYPE_CHECKING:
    from anomaly import PluginManager

__all__ = ["GaussianAccumulator", "PadimNet"]

logger = logging.getLogger(__name__)

# Positions whose covariance is inverted at once (float64 temporaries of 256 x d x d).
_INVERSE_BLOCK = 256


class GaussianAccumulator:
    """Running sums for one multivariate Gaussian per position, without keeping embeddings.

    Embeddings are shifted by the first batch's mean before summing, so ``E[x x^T] - mu mu^T``
    loses no precision to cancellation. Outer products are added in place in float32 (one
    batched ``baddbmm``) and flushed into float64 totals every ``flush_every`` images, which
    bounds float32 rounding while keeping the per-batch cost low.

    Args:
        positions: Number of positions P.
        features: Dimensions d of each embedding vector.
        device: Where the sums live.
        flush_every: Images summed in float32 before they are moved into the float64 totals.
    """

    def __init__(
        self,
        positions: int,
        features: int,
        device: torch.device | None = None,
        flush_every: int = 256,
    ) -> None:
        self.count = 0
        self.flush_every = flush_every
        self.shift: torch.Tensor | None = None
        self.sum = torch.zeros(positions, features, dtype=torch.float64, device=device)
        self.outer = torch.zeros(positions, features, features, dtype=torch.float64, device=device)
        self._pending = 0
        self._pending_sum = torch.zeros(positions, features, device=device)
        self._pending_outer = torch.zeros(positions, features, features, device=device)

    def update(self, embedding: torch.Tensor) -> None:
        """Add a batch: (B, P, d) float."""
        values = embedding.detach().to(self.sum.device, torch.float32)
        if self._pending_outer.numel() == 0:  # released by compute
            self._pending_sum = torch.zeros_like(self.sum, dtype=torch.float32)
            self._pending_outer = torch.zeros_like(self.outer, dtype=torch.float32)
        if self.shift is None:
            self.shift = values.mean(dim=0)
        centered = (values - self.shift).transpose(0, 1).contiguous()  # (P, B, d)
        self._pending_sum += centered.sum(dim=1)
        self._pending_outer.baddbmm_(centered.transpose(1, 2), centered)
        self._pending += int(values.shape[0])
        if self._pending >= self.flush_every:
            self._flush()

    def _flush(self) -> None:
        if self._pending == 0:
            return
        self.sum += self._pending_sum.double()
        self.outer += self._pending_outer.double()
        self.count += self._pending
        self._pending = 0
        self._pending_sum.zero_()
        self._pending_outer.zero_()

    def recenter(self, shift: torch.Tensor) -> None:
        """Express the sums relative to another shift (P, d), keeping the statistics."""
        self._flush()
        if self.shift is None:
            self.shift = shift.float().clone()
            return
        offset = (self.shift - shift.to(self.shift)).double()  # old shift minus new shift
        # sum (x - new) = S + n o;  sum (x - new)(x - new)^T = O + S o^T + o S^T + n o o^T
        cross = torch.einsum("pi,pj->pij", self.sum, offset)
        self.outer += cross + cross.transpose(1, 2)
        self.outer += self.count * torch.einsum("pi,pj->pij", offset, offset)
        self.sum += self.count * offset
        self.shift = shift.float().clone()

    def all_reduce(self) -> None:
        """Sum the statistics of every process of a ``torch.distributed`` job (DDP fitting)."""
        if self.shift is None:
            msg = "PaDiM saw no training images in this process; give every process data"
            raise ConfigError(msg)
        shift = self.shift.clone()
        torch.distributed.broadcast(shift, src=0)  # one common shift
        self.recenter(shift)
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum.device)
        for tensor in (self.sum, self.outer, count):
            torch.distributed.all_reduce(tensor)
        self.count = round(float(count))

    def compute(self, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(mean (P, d), inverse covariance (P, d, d))``, both float32.

        The covariance is the unbiased sample covariance plus ``epsilon * I`` (PaDiM, Eq. 1).
        Positions are inverted in blocks of ``_INVERSE_BLOCK``: besides the float64 sums, only
        the float32 result and one block of float64 temporaries exist at a time.
        """
        self._flush()
        if self.count < 1 or self.shift is None:
            msg = "PaDiM saw no training images; give the datamodule a non-empty train split"
            raise ConfigError(msg)
        # The float32 staging sums are refilled (re-allocated) only if more images arrive.
        self._pending_sum = self._pending_outer = torch.empty(0, device=self.sum.device)
        positions, features = (int(size) for size in self.sum.shape)
        centered_mean = self.sum / self.count
        identity = torch.eye(features, dtype=torch.float64, device=self.sum.device)
        inverse = torch.empty(positions, features, features, device=self.sum.device)
        for begin in range(0, positions, _INVERSE_BLOCK):
            end = min(begin + _INVERSE_BLOCK, positions)
            mean = centered_mean[begin:end]
            covariance = self.outer[begin:end] - self.count * torch.einsum("pi,pj->pij", mean, mean)
            covariance /= max(1, self.count - 1)
            covariance += epsilon * identity
            inverse[begin:end] = torch.linalg.inv(covariance)
        mean = self.shift.double() + centered_mean
        return mean.float(), inverse


class PadimNet(nn.Module):
    """Score images by the Mahalanobis distance of each position's embedding.

    Embeddings are the backbone's feature maps of the chosen strides, resized (nearest) to the
    largest map, concatenated and reduced to ``n_features`` randomly chosen channels (fixed by
    ``seed`` and saved in the state dict). ``mean`` and ``inv_covariance`` are empty until
    ``set_gaussian`` (the Lightning module's ``fit_end``) or ``load_state_dict``; they hold one
    Gaussian per position, so test images must have the training size.

    Args:
        backbone: timm model name.
        strides: Feature levels by stride.
        out_indices: timm feature indices, used instead of ``strides`` when given.
        pretrained: Load pretrained weights (see ``anomaly.backbones.FeatureExtractor``).
        pretrained_weights: Local weight file for the backbone.
        n_features: Channels kept by random selection; None keeps all.
        sigma: Gaussian smoothing of the anomaly map, in input pixels; 0 turns it off.
        seed: Seed of the channel selection.
        plugin_manager: Where to look up backbone weight providers.
        backbone_runtime: How the frozen backbone runs (``FeatureExtractor``'s ``runtime``).
    """

    channel_index: torch.Tensor
    mean: torch.Tensor
    inv_covariance: torch.Tensor

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        strides: Sequence[int] | None = (4, 8, 16),
        *,
        out_indices: Sequence[int] | None = None,
        pretrained: bool = True,
        pretrained_weights: str | os.PathLike[str] | None = None,
        n_features: int | None = 100,
        sigma: float = 4.0,
        seed: int = 0,
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
        channels = sum(self.feature_extractor.channels)
        if n_features is not None and not 1 <= n_features <= channels:
            msg = (
                f"n_features {n_features!r} must lie in [1, {channels}] (the channels of the "
                f"chosen levels of {backbone!r}), or be None to keep them all"
            )
            raise ConfigError(msg)
        kept = channels if n_features is None else n_features
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(channels, generator=generator)[:kept].sort().values
        self.register_buffer("channel_index", index)
        self.blur = GaussianBlur2d(sigma)
        self.register_buffer("mean", torch.empty(kept, 0, 0))
        self.register_buffer("inv_covariance", torch.empty(0, kept, kept))

    @property
    def n_features(self) -> int:
        """Channels of each embedding vector."""
        return int(self.channel_index.numel())

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """Return embeddings.

        Args:
            image: (B, 3, H, W) float in [0, 1].

        Returns:
            (B, d, h, w) float32, (h, w) the size of the finest chosen feature map.
        """
        features = self.feature_extractor(imagenet_normalize(image))
        embedding = embedding_stack(features, mode="nearest")
        return embedding.index_select(1, self.channel_index)

    def set_gaussian(self, mean: torch.Tensor, inv_covariance: torch.Tensor) -> None:
        """Set the statistics: ``mean`` (d, h, w) and ``inv_covariance`` (h * w, d, d)."""
        features, height, width = mean.shape
        if features != self.n_features or inv_covariance.shape != (
            height * width,
            features,
            features,
        ):
            msg = (
                f"Gaussian statistics of shapes {tuple(mean.shape)} and "
                f"{tuple(inv_covariance.shape)} do not fit {self.n_features} features"
            )
            raise ValueError(msg)
        device = self.mean.device
        self.mean = mean.detach().to(device, torch.float32).contiguous()
        self.inv_covariance = inv_covariance.detach().to(device, torch.float32).contiguous()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score images.

        Args:
            image: (B, 3, H, W) float in [0, 1], of the size the model was fitted on.

        Returns:
            ``(pred_score (B,), anomaly_map (B, H, W))``: Mahalanobis distances, the score being
            the largest value of the smoothed map.

        Raises:
            NotFittedError: When the Gaussian statistics are empty.
            DataError: When the image size differs from the training size.
        """
        if self.inv_covariance.shape[0] == 0:
            msg = "PaDiM's Gaussian statistics are empty; fit the model or load a fitted checkpoint"
            raise NotFittedError(msg)
        embedding = self.embed(image)
        batch, features, height, width = embedding.shape
        if (height, width) != tuple(self.mean.shape[1:]):
            msg = (
                f"PaDiM was fitted on {tuple(self.mean.shape[1:])} feature maps but these "
                f"images give {(height, width)} (image size {tuple(image.shape[-2:])}); resize "
                f"test images to the training size"
            )
            raise DataError(msg)
        delta = (embedding - self.mean.unsqueeze(0)).reshape(batch, features, height * width)
        delta = delta.permute(2, 0, 1)  # (P, B, d): one batched product per position
        squared = (torch.bmm(delta, self.inv_covariance) * delta).sum(dim=2)  # (P, B)
        distance = squared.clamp_min(0.0).sqrt().T.reshape(batch, 1, height, width)
        anomaly_map = F.interpolate(
            distance, size=image.shape[-2:], mode="bilinear", align_corners=False
        )
        anomaly_map = self.blur(anomaly_map.squeeze(1))
        score = anomaly_map.flatten(1).max(dim=1).values
        return score, anomaly_map
