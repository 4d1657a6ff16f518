"""CFA's maths as a plain ``nn.Module``: patch descriptor, memory bank, coupled-hypersphere loss."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from anomaly import ConfigError
from anomaly.backbones import FeatureExtractor, imagenet_normalize
from anomaly_models_memory._common import (
    GaussianBlur2d,
    NotFittedError,
    embedding_stack,
    world_size,
)

if TYPE_CHECKING:
    from anomaly import PluginManager

__all__ = [
    "CfaNet",
    "CoordConv2d",
    "MemoryAccumulator",
    "coupled_hypersphere_loss",
    "kmeans",
    "nearest_squared_distances",
]

logger = logging.getLogger(__name__)

# Entries of one block of a query-by-bank distance matrix, per image (16 MiB of float32):
# smaller blocks cost more in per-call overhead than they save in cache misses.
_BLOCK_ENTRIES = 1 << 22


class CoordConv2d(nn.Module):
    """A convolution that also sees each position's coordinates (Liu et al., 2018).

    Two channels holding the column and row coordinates, scaled to [-1, 1], are appended to
    the input, so the layer can map the same feature differently at different places.

    Args:
        in_channels: Channels of the input, without the coordinates.
        out_channels: Channels of the output.
        kernel_size: Side of the (square) kernel; CFA's patch descriptor uses 1.
        generator: Seeded source of the initial weights (PyTorch's default scheme).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        conv = nn.Conv2d(in_channels + 2, out_channels, kernel_size, padding=kernel_size // 2)
        # nn.Conv2d's own initialization, drawn from ``generator`` so that a seed fixes it.
        nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5), generator=generator)
        if conv.bias is not None:
            bound = 1.0 / math.sqrt((in_channels + 2) * kernel_size * kernel_size)
            nn.init.uniform_(conv.bias, -bound, bound, generator=generator)
        self.conv = conv

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Map ``features`` (B, C, h, w) to (B, out_channels, h, w)."""
        batch, _, height, width = features.shape
        rows = torch.linspace(-1.0, 1.0, height, dtype=features.dtype, device=features.device)
        cols = torch.linspace(-1.0, 1.0, width, dtype=features.dtype, device=features.device)
        grid_rows = rows.view(1, 1, height, 1).expand(batch, 1, height, width)
        grid_cols = cols.view(1, 1, 1, width).expand(batch, 1, height, width)
        out: torch.Tensor = self.conv(torch.cat([features, grid_cols, grid_rows], dim=1))
        return out


def nearest_squared_distances(
    query: torch.Tensor, bank: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the ``k`` smallest squared Euclidean distances to bank rows and their indices.

    Queries are split into blocks along their second dimension, of a size fixed by the bank
    size alone, so memory stays bounded and the number of blocks is known when a model is
    traced or exported (no data-dependent control flow).

    Args:
        query: (B, P, D) float.
        bank: (M, D) float, ``M >= k``.
        k: Neighbours per query.

    Returns:
        ``(distances, indices)``, both (B, P, k), nearest first.
    """
    batch, positions, dim = query.shape
    bank_norms = (bank * bank).sum(dim=1)
    block = max(1, _BLOCK_ENTRIES // max(1, int(bank.shape[0])))
    distances, indices = [], []
    for start in range(0, int(positions), block):
        part = query[:, start : start + block].reshape(-1, dim)
        # ||q - m||^2 = ||q||^2 + ||m||^2 - 2 q.m; ||q||^2 does not change the order, so it is
        # added to the k winners only. One fused product per block.
        partial = torch.addmm(bank_norms, part, bank.T, alpha=-2.0)
        if k == 1:  # min is much cheaper than topk
            values, index = partial.min(dim=1, keepdim=True)
        else:
            values, index = torch.topk(partial, k, dim=1, largest=False)
        # Rounding can dip below zero for (near) duplicates.
        values = (values + (part * part).sum(dim=1, keepdim=True)).clamp_min(0.0)
        distances.append(values.reshape(batch, -1, k))
        indices.append(index.reshape(batch, -1, k))
    if len(distances) == 1:
        return distances[0], indices[0]
    return torch.cat(distances, dim=1), torch.cat(indices, dim=1)


def coupled_hypersphere_loss(
    target: torch.Tensor,
    bank: torch.Tensor,
    radius: torch.Tensor,
    num_nearest: int = 3,
    num_hard_negatives: int = 3,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Return CFA's loss ``L_att + L_rep`` (Lee et al., 2022).

    For every target-oriented patch feature ``phi(p_t)``, with ``D`` the squared Euclidean
    distance and ``c^k`` the memorized features sorted by distance:

    - attraction: ``1/(TK) sum_t sum_{k<=K} max(0, D(phi(p_t), c^k) - r^2)``: the ``K``
      nearest memorized features should lie within the hypersphere of radius ``r``;
    - repulsion: ``1/(TJ) sum_t sum_{K<j<=K+J} max(0, r^2 - D(phi(p_t), c^j) - alpha)``: the
      next ``J`` (hard negatives) should stay outside it, by a margin ``alpha``.

    Neighbours are searched without gradients; the distances to them are then computed
    exactly (not through the expanded product) so that gradients and small distances are
    precise.

    Args:
        target: (N, D) target-oriented features.
        bank: (M, D) memorized features; no gradient flows into them.
        radius: () the hypersphere radius ``r`` (may require gradients).
        num_nearest: ``K``.
        num_hard_negatives: ``J``; 0 drops the repulsion term.
        alpha: Margin of the repulsion term.

    Returns:
        () the loss.
    """
    bank = bank.detach()
    memory = int(bank.shape[0])
    k = min(num_nearest, memory)
    j = min(num_hard_negatives, memory - k)
    with torch.no_grad():
        _, index = nearest_squared_distances(target.detach().unsqueeze(0), bank, k + j)
    neighbours = bank[index.squeeze(0)]  # (N, K + J, D)
    squared = (target.unsqueeze(1) - neighbours).pow(2).sum(dim=-1)  # (N, K + J)
    boundary = radius * radius
    loss = F.relu(squared[:, :k] - boundary).mean()
    if j > 0:
        loss = loss + F.relu(boundary - squared[:, k:] - alpha).mean()
    return loss


def kmeans(
    points: torch.Tensor, count: int, *, iterations: int = 100, seed: int = 0
) -> torch.Tensor:
    """Return ``count`` cluster centres of ``points`` by k-means (k-means++ seeding, Lloyd).

    Args:
        points: (N, D) float.
        count: Number of centres; all points (copied) when ``count >= N``.
        iterations: Most Lloyd iterations; stops earlier when no assignment changes.
        seed: Seed of the k-means++ draws.

    Returns:
        (min(count, N), D) float32 centres on the device of ``points``.
    """
    values = points.detach().float()
    total = int(values.shape[0])
    if count >= total:
        return values.clone()
    if count < 1:
        msg = f"k-means needs at least one centre, got {count!r}"
        raise ConfigError(msg)
    generator = torch.Generator().manual_seed(seed)
    norms = (values * values).sum(dim=1)
    first = int(torch.randint(0, total, (1,), generator=generator))
    chosen = [first]
    nearest = (norms - 2.0 * (values @ values[first]) + norms[first]).clamp_min(0.0)
    for _ in range(1, count):
        weights = nearest.cpu().double()
        if float(weights.sum()) <= 0.0:  # every point already coincides with a centre
            weights = torch.ones_like(weights)
        pick = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(pick)
        distance = (norms - 2.0 * (values @ values[pick]) + norms[pick]).clamp_min(0.0)
        torch.minimum(nearest, distance, out=nearest)
    centres = values[torch.tensor(chosen, device=values.device)].clone()
    assignment = torch.full((total,), -1, dtype=torch.long, device=values.device)
    for _ in range(iterations):
        _, nearest_centre = nearest_squared_distances(values.unsqueeze(0), centres, 1)
        new_assignment = nearest_centre.view(-1)
        if torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        sums = torch.zeros_like(centres).index_add_(0, assignment, values)
        counts = torch.bincount(assignment, minlength=count).unsqueeze(1)
        # A centre that lost all its points keeps its place rather than becoming NaN.
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    return centres


class MemoryAccumulator:
    """Running mean of target-oriented feature maps over training images (CFA memory init).

    Args:
        device: Where the sums live.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.count = 0
        self.sum: torch.Tensor | None = None

    def update(self, target: torch.Tensor) -> None:
        """Add a batch of maps: (B, D, h, w) float; every batch must have the same (D, h, w)."""
        values = target.detach().to(self.device, torch.float32)
        if self.sum is None:
            self.sum = torch.zeros(values.shape[1:], dtype=torch.float64, device=values.device)
        elif values.shape[1:] != self.sum.shape:
            msg = (
                f"CFA needs training images of one size, but feature maps of "
                f"{tuple(self.sum.shape[1:])} and {tuple(values.shape[2:])} were seen; resize "
                f"the images to one size"
            )
            raise ConfigError(msg)
        self.sum += values.sum(dim=0).double()
        self.count += int(values.shape[0])

    def all_reduce(self) -> None:
        """Sum the statistics of every process of a ``torch.distributed`` job."""
        if self.sum is None:
            msg = "CFA saw no training images in this process; give every process data"
            raise ConfigError(msg)
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum.device)
        torch.distributed.all_reduce(self.sum)
        torch.distributed.all_reduce(count)
        self.count = round(float(count))

    def mean(self) -> torch.Tensor:
        """Return the mean feature at every position as rows: (h * w, D) float32."""
        if self.sum is None or self.count == 0:
            msg = "CFA saw no training images; give the datamodule a non-empty train split"
            raise ConfigError(msg)
        mean = (self.sum / self.count).float()
        return mean.flatten(1).T.contiguous()


class CfaNet(nn.Module):
    """Score images by the distance of adapted patch features to a memory of normal ones.

    Patch features are backbone feature maps of the chosen strides, each averaged over a
    ``patch_size`` neighbourhood, resized (bilinear) to the largest map and concatenated. The
    patch descriptor, a 1x1 CoordConv layer, maps them to target-oriented features of
    ``channels // gamma_d`` dimensions. ``memory_bank`` is empty until ``set_memory_bank``
    (see ``build_memory_bank``) or ``load_state_dict``.

    Args:
        backbone: timm model name.
        strides: Feature levels by stride.
        out_indices: timm feature indices, used instead of ``strides`` when given.
        pretrained: Load pretrained weights (see ``anomaly.backbones.FeatureExtractor``).
        pretrained_weights: Local weight file for the backbone.
        backbone_runtime: How the frozen backbone runs (see ``FeatureExtractor``).
        patch_size: Side of the local neighbourhood averaged into each patch feature (odd).
        feature_scale: Factor applied to the patch features before the descriptor; None:
            ``1 / channels``.
        gamma_d: Reduction of the descriptor's output dimensions (``channels // gamma_d``).
        gamma_c: Compression of the memory bank: ``h * w // gamma_c`` k-means centres.
        num_nearest: ``K``, memorized features attracted, and softmin-weighted in the score.
        num_hard_negatives: ``J``, hard negatives repelled.
        radius: Initial hypersphere radius ``r``.
        learn_radius: Train ``r`` with the descriptor (a soft boundary) instead of fixing it.
        alpha: Margin of the repulsion term.
        sigma: Gaussian smoothing of the anomaly map, in input pixels; 0 turns it off.
        seed: Seed of the descriptor's initial weights and of k-means.
        plugin_manager: Where to look up backbone weight providers.
    """

    memory_bank: torch.Tensor

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        strides: Sequence[int] | None = (8, 16),
        *,
        out_indices: Sequence[int] | None = None,
        pretrained: bool = True,
        pretrained_weights: str | os.PathLike[str] | None = None,
        backbone_runtime: str = "eager",
        patch_size: int = 3,
        feature_scale: float | None = None,
        gamma_d: int = 1,
        gamma_c: int = 1,
        num_nearest: int = 3,
        num_hard_negatives: int = 3,
        radius: float = 1e-5,
        learn_radius: bool = True,
        alpha: float = 0.1,
        sigma: float = 4.0,
        seed: int = 0,
        plugin_manager: PluginManager | None = None,
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
        if not 1 <= gamma_d <= channels:
            msg = (
                f"gamma_d {gamma_d!r} must lie in [1, {channels}] (the channels of the chosen "
                f"levels of {backbone!r}); the paper uses 1"
            )
            raise ConfigError(msg)
        self.patch_size = patch_size
        # Backbone features are O(1) per channel, so squared distances between patches grow
        # with the channel count; scaling by 1 / channels brings them to the range that the
        # fixed r = 1e-5 and alpha = 0.1 of the loss are meaningful in.
        self.feature_scale = 1.0 / channels if feature_scale is None else float(feature_scale)
        self.gamma_c = gamma_c
        self.num_nearest = num_nearest
        self.num_hard_negatives = num_hard_negatives
        self.alpha = float(alpha)
        self.seed = seed
        self.embedding_dim = channels // gamma_d
        generator = torch.Generator().manual_seed(seed)
        self.descriptor = CoordConv2d(channels, self.embedding_dim, 1, generator=generator)
        self.radius = nn.Parameter(torch.tensor(float(radius)), requires_grad=learn_radius)
        self.blur = GaussianBlur2d(sigma)
        self.register_buffer("memory_bank", torch.empty(0, self.embedding_dim))

    # --- features -----------------------------------------------------------------------

    def patch_features(self, image: torch.Tensor) -> torch.Tensor:
        """Return the frozen backbone's patch features.

        Args:
            image: (B, 3, H, W) float in [0, 1].

        Returns:
            (B, C, h, w) float32, (h, w) the size of the finest chosen feature map, scaled by
            ``feature_scale``.
        """
        features = self.feature_extractor(imagenet_normalize(image))
        stacked = embedding_stack(features, mode="bilinear", patch_size=self.patch_size)
        return stacked * self.feature_scale

    def describe(self, image: torch.Tensor) -> torch.Tensor:
        """Return target-oriented features ``phi(p)``: (B, D, h, w) for images in [0, 1].

        No gradient reaches the frozen backbone; the descriptor's output carries gradients
        when they are enabled.
        """
        with torch.no_grad():
            features = self.patch_features(image)
        return self.descriptor(features)  # type: ignore[no-any-return]  # nn.Module.__call__

    # --- memory bank --------------------------------------------------------------------

    def set_memory_bank(self, bank: torch.Tensor) -> None:
        """Replace the memory bank: (M, D) float."""
        if bank.ndim != 2 or bank.shape[1] != self.embedding_dim or bank.shape[0] < 1:
            msg = (
                f"memory bank of shape {tuple(bank.shape)} does not fit features of "
                f"{self.embedding_dim} dimensions; give (M, {self.embedding_dim}), M >= 1"
            )
            raise ValueError(msg)
        self.memory_bank = bank.detach().to(self.memory_bank.device, torch.float32).contiguous()

    def compress(self, mean_features: torch.Tensor) -> torch.Tensor:
        """Compress per-position mean features (h * w, D) to ``h * w // gamma_c`` centres."""
        count = max(1, int(mean_features.shape[0]) // self.gamma_c)
        if count >= mean_features.shape[0]:
            return mean_features
        return kmeans(mean_features, count, seed=self.seed)

    def build_memory_bank(self, images: Iterable[torch.Tensor]) -> int:
        """Build the memory bank from batches of good images, (B, 3, H, W) in [0, 1] each.

        The descriptor's features of every training image are averaged position by position,
        then compressed by k-means, as the paper initializes its memory; the bank then stays
        fixed. With data-parallel training every process adds its share and the sums are
        reduced across processes, so every process holds the same bank.

        Returns:
            The number of images seen (by all processes).
        """
        accumulator = MemoryAccumulator()
        with torch.no_grad():
            for image in images:
                accumulator.update(self.describe(image))
        if world_size() > 1:
            accumulator.all_reduce()
        self.set_memory_bank(self.compress(accumulator.mean()))
        return accumulator.count

    # --- training and scoring -----------------------------------------------------------

    def _require_bank(self) -> torch.Tensor:
        bank = self.memory_bank
        if bank.shape[0] == 0:
            msg = "CFA's memory bank is empty; fit the model or load a fitted checkpoint"
            raise NotFittedError(msg)
        return bank

    def loss(self, image: torch.Tensor) -> torch.Tensor:
        """Return the coupled-hypersphere loss of a batch of good images in [0, 1]: ()."""
        bank = self._require_bank()
        target = self.describe(image)
        flat = target.permute(0, 2, 3, 1).reshape(-1, target.shape[1])
        return coupled_hypersphere_loss(
            flat,
            bank,
            self.radius,
            num_nearest=self.num_nearest,
            num_hard_negatives=self.num_hard_negatives,
            alpha=self.alpha,
        )

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score images.

        Each position scores its squared distance to the nearest memorized feature, weighted
        by that feature's softmin weight among the ``K`` nearest (as in the paper): confident
        matches keep their distance, ambiguous ones are damped.

        Args:
            image: (B, 3, H, W) float in [0, 1], any size the backbone accepts.

        Returns:
            ``(pred_score (B,), anomaly_map (B, H, W))`` raw scores, higher is more anomalous;
            the image score is the largest value of the smoothed map.

        Raises:
            NotFittedError: When the memory bank is empty.
        """
        bank = self._require_bank()
        target = self.describe(image)
        batch, channels, height, width = target.shape
        queries = target.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        k = min(self.num_nearest, int(bank.shape[0]))
        squared, _ = nearest_squared_distances(queries, bank, k)
        weight = F.softmin(squared, dim=-1)[..., 0]
        patch_scores = weight * squared[..., 0]
        anomaly_map = F.interpolate(
            patch_scores.reshape(batch, 1, height, width),
            size=image.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )
        anomaly_map = self.blur(anomaly_map.squeeze(1))
        score = anomaly_map.flatten(1).max(dim=1).values
        return score, anomaly_map
