"""Pieces shared by the memory-bank models: map smoothing, errors, option checks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anomaly import AnomalyError, ConfigError

__all__ = [
    "GaussianBlur2d",
    "NotFittedError",
    "check_levels",
    "embedding_stack",
    "gather_rows",
    "world_size",
]


class NotFittedError(AnomalyError, RuntimeError):
    """A model was asked for scores before it was fitted (or loaded from a checkpoint)."""


class GaussianBlur2d(nn.Module):
    """Separable Gaussian smoothing of anomaly maps.

    Args:
        sigma: Standard deviation in pixels; 0 turns smoothing off.

    The kernel spans ``2 * ceil(4 * sigma) + 1`` pixels and is rebuilt on the fly (it is not
    part of the state dict).
    """

    kernel: torch.Tensor

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = float(sigma)
        radius = math.ceil(4 * self.sigma) if self.sigma > 0 else 0
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (offsets / self.sigma) ** 2) if self.sigma > 0 else torch.ones(1)
        self.register_buffer("kernel", kernel / kernel.sum(), persistent=False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Smooth ``maps``: (B, H, W) float; returns the same shape."""
        radius = self.kernel.numel() // 2
        if radius == 0:
            return maps
        height, width = maps.shape[-2:]
        # Reflection needs the padding to be smaller than the map; tiny maps replicate instead.
        mode = "reflect" if radius < min(height, width) else "replicate"
        kernel = self.kernel.to(maps.dtype)
        out = maps.unsqueeze(1)
        out = F.pad(out, (radius, radius, 0, 0), mode=mode)
        out = F.conv2d(out, kernel.view(1, 1, 1, -1))
        out = F.pad(out, (0, 0, radius, radius), mode=mode)
        out = F.conv2d(out, kernel.view(1, 1, -1, 1))
        return out.squeeze(1)


def check_levels(name: str, levels: Sequence[int] | None, minimum: int = 1) -> list[int] | None:
    """Return ``levels`` as a list of ints ``>= minimum``, or raise ConfigError naming ``name``."""
    if levels is None:
        return None
    if isinstance(levels, str | bytes) or not isinstance(levels, Sequence):
        msg = f"{name} must be a list of ints, got {levels!r}; e.g. [8, 16]"
        raise ConfigError(msg)
    values = list(levels)
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        msg = f"{name} must be a non-empty list of ints, got {levels!r}; e.g. [8, 16]"
        raise ConfigError(msg)
    if any(value < minimum for value in values):
        msg = f"{name} must hold values >= {minimum}, got {levels!r}"
        raise ConfigError(msg)
    return values


def world_size() -> int:
    """Return the number of processes of the running ``torch.distributed`` job (1 if none)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_world_size())
    return 1


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Concatenate the (N_r, D) rows every process holds, in rank order; N_r may differ.

    Memory-bank models fitted with data-parallel training (Lightning's DDP) must build their
    bank from every process's share of the training set, not only their own.
    """
    if world_size() == 1:
        return local
    processes = world_size()
    count = torch.tensor([local.shape[0]], device=local.device)
    counts = [torch.zeros_like(count) for _ in range(processes)]
    torch.distributed.all_gather(counts, count)
    longest = int(max(int(c) for c in counts))
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.zeros_like(padded) for _ in range(processes)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([part[: int(c)] for part, c in zip(parts, counts, strict=True)])


def embedding_stack(
    features: Sequence[torch.Tensor], mode: str = "bilinear", patch_size: int = 1
) -> torch.Tensor:
    """Resize feature maps to the largest one and concatenate them along channels.

    Args:
        features: (B, C_i, h_i, w_i) maps.
        mode: ``bilinear`` or ``nearest`` interpolation for the smaller maps.
        patch_size: Side of the local average taken on each map first (1: none); stride 1,
            zero padding excluded from the average so borders are not darkened.

    Returns:
        (B, sum C_i, h, w) with (h, w) the largest map size.
    """
    if patch_size > 1:
        features = [
            F.avg_pool2d(
                feature, patch_size, stride=1, padding=patch_size // 2, count_include_pad=False
            )
            for feature in features
        ]
    height = max(int(feature.shape[-2]) for feature in features)
    width = max(int(feature.shape[-1]) for feature in features)
    resized = []
    for feature in features:
        if feature.shape[-2:] != (height, width):
            align = False if mode == "bilinear" else None
            feature = F.interpolate(feature, size=(height, width), mode=mode, align_corners=align)
        resized.append(feature)
    return torch.cat(resized, dim=1)
