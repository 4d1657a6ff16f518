"""Pieces shared by the memory-bank models: map smoothing, errors, option checks."""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from typing import TypeVar

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
    features: Sequence[torch.Tensor],
    mode: str = "bilinear",
    patch_size: int = 1,
    *,
    count_padding: bool = False,
) -> torch.Tensor:
    """Resize feature maps to the largest one and concatenate them along channels.

    Args:
        features: (B, C_i, h_i, w_i) maps.
        mode: ``bilinear`` or ``nearest`` interpolation for the smaller maps.
        patch_size: Side of the local average taken on each map first (1: none); stride 1.
        count_padding: Average border cells over the whole window, zero padding included
            (borders darken, as in PatchCore's reference code); False averages over the cells
            inside the map only.

    Returns:
        (B, sum C_i, h, w) with (h, w) the largest map size.
    """
    if patch_size > 1:
        features = [
            F.avg_pool2d(
                feature,
                patch_size,
                stride=1,
                padding=patch_size // 2,
                count_include_pad=count_padding,
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


class RunningMoments:
    """Running mean and covariance of (N, D) rows in float64, without keeping the rows.

    Rows are shifted by the first batch's mean before summing, so ``E[x x^T] - mu mu^T`` loses
    no precision to cancellation; one float64 ``addmm`` per batch.

    Args:
        features: Dimensions D of each row.
        device: Where the sums live.
    """

    def __init__(self, features: int, device: torch.device | None = None) -> None:
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.outer = torch.zeros(features, features, dtype=torch.float64, device=device)

    def update(self, rows: torch.Tensor) -> None:
        """Add a batch of rows: (B, D) float."""
        values = rows.detach().to(self.sum.device, torch.float64)
        if self.shift is None:
            self.shift = values.mean(dim=0)
        centered = values - self.shift
        self.sum += centered.sum(dim=0)
        self.outer.addmm_(centered.T, centered)
        self.count += int(values.shape[0])

    def recenter(self, shift: torch.Tensor) -> None:
        """Express the sums relative to another shift (D,), keeping the statistics."""
        shift = shift.to(self.sum)
        if self.shift is not None:
            # sum (x - new) = S + n o;  sum (x - new)(x - new)^T = O + S o^T + o S^T + n o o^T
            offset = self.shift - shift
            cross = torch.outer(self.sum, offset)
            self.outer += cross + cross.T + self.count * torch.outer(offset, offset)
            self.sum += self.count * offset
        self.shift = shift.clone()

    def all_reduce(self) -> None:
        """Sum the moments of every process of a ``torch.distributed`` job (DDP fitting)."""
        shift = self.shift.clone() if self.shift is not None else torch.zeros_like(self.sum)
        torch.distributed.broadcast(shift, src=0)  # one common shift
        self.recenter(shift)
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum.device)
        for tensor in (self.sum, self.outer, count):
            torch.distributed.all_reduce(tensor)
        self.count = round(float(count))

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(mean (D,), unbiased covariance (D, D))``, both float64.

        Raises:
            ConfigError: When no rows were added.
        """
        if self.count < 1 or self.shift is None:
            msg = "no training features were collected; give a non-empty train split"
            raise ConfigError(msg)
        centered_mean = self.sum / self.count
        scatter = self.outer - self.count * torch.outer(centered_mean, centered_mean)
        covariance = scatter / max(1, self.count - 1)
        return self.shift + centered_mean, (covariance + covariance.T) / 2


def _kept_components(variances: torch.Tensor, n_components: int | None, level: float | None) -> int:
    """Return how many of the descending ``variances`` a PCA keeps (see pca_from_covariance)."""
    if (n_components is None) == (level is None):
        msg = "give exactly one of n_components and level"
        raise ValueError(msg)
    # Eigenvalues this small relative to the largest are rounding noise of a rank-deficient matrix.
    tolerance = float(variances[0]) * variances.numel() * torch.finfo(variances.dtype).eps
    rank = max(1, int((variances > tolerance).sum()))
    if n_components is not None:
        return min(n_components, rank)
    total = float(variances.sum())
    if total <= 0 or level is None:
        return 1
    # The fewest axes reaching the level; a small slack so that level 1.0 stops at the rank.
    reached = torch.nonzero(variances.cumsum(0) / total >= level - 1e-9)
    return min(int(reached[0]) + 1 if reached.numel() else rank, rank)


def _signed(components: torch.Tensor) -> torch.Tensor:
    """Sign each row so that its largest-magnitude entry is positive (a deterministic PCA)."""
    largest = components.abs().argmax(dim=1, keepdim=True)
    return components * torch.sign(components.gather(1, largest))


def pca_from_covariance(
    covariance: torch.Tensor, n_components: int | None = None, level: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return principal axes and their variances from a covariance matrix.

    Exactly one of ``n_components`` and ``level`` is given: a fixed number of axes, or the
    fewest axes whose variances add up to at least ``level`` of the total. Axes of zero variance
    are never kept. Each axis is signed so that its largest-magnitude entry is positive, which
    makes the result deterministic.

    Args:
        covariance: (D, D) symmetric positive semi-definite; float64 recommended.
        n_components: Number of axes, at most D (fewer when the rank is lower).
        level: Fraction of the total variance to explain, in (0, 1].

    Returns:
        ``(components (k, D), variances (k,))``, largest variance first, the dtype of
        ``covariance``.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    variances = eigenvalues.flip(0).clamp_min(0.0)
    kept = _kept_components(variances, n_components, level)
    return _signed(eigenvectors.flip(1).T[:kept]), variances[:kept]


def pca_from_rows(
    rows: torch.Tensor, n_components: int | None = None, level: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the mean, principal axes and variances of (N, D) rows, like ``pca_from_covariance``.

    The decomposition is of the (N, N) Gram matrix of the centred rows, which has the same
    non-zero eigenvalues as the (D, D) covariance and is the cheaper one when N < D.

    Returns:
        ``(mean (D,), components (k, D), variances (k,))`` in float64.
    """
    values = rows.detach().double()
    count = values.shape[0]
    mean = values.mean(dim=0)
    centered = values - mean
    gram = centered @ centered.T / max(1, count - 1)
    eigenvalues, eigenvectors = torch.linalg.eigh((gram + gram.T) / 2)
    variances = eigenvalues.flip(0).clamp_min(0.0)
    kept = _kept_components(variances, n_components, level)
    # Axis j of the covariance is X^T u_j / sqrt((N - 1) lambda_j) for Gram eigenvector u_j.
    vectors = eigenvectors.flip(1)[:, :kept]
    scale = (variances[:kept] * max(1, count - 1)).sqrt().clamp_min(1e-300)
    components = (centered.T @ vectors / scale).T
    return mean, _signed(components), variances[:kept]


class PcaAccumulator:
    """Rows streamed in for a PCA, held in the cheaper of two forms.

    While fewer rows than dimensions have arrived they are kept (N x D float32, less than the
    covariance); from then on only their float64 moments are (D x D, see ``RunningMoments``).
    The PCA is then computed from the Gram matrix of the rows or from the covariance.

    Args:
        features: Dimensions D of each row.
        device: Where the rows or sums live.
    """

    def __init__(self, features: int, device: torch.device | None = None) -> None:
        self.features = features
        self.device = device
        self.rows: list[torch.Tensor] = []
        self.moments: RunningMoments | None = None

    @property
    def count(self) -> int:
        """Rows added so far."""
        if self.moments is not None:
            return self.moments.count
        return sum(int(rows.shape[0]) for rows in self.rows)

    def update(self, rows: torch.Tensor) -> None:
        """Add a batch of rows: (B, D) float."""
        if self.moments is not None:
            self.moments.update(rows)
            return
        self.rows.append(rows.detach().to(self.device, torch.float32))
        if self.count >= self.features:
            self._to_moments()

    def _to_moments(self) -> None:
        if self.moments is None:
            self.moments = RunningMoments(self.features, self.device)
            for rows in self.rows:
                self.moments.update(rows)
            self.rows = []

    def all_reduce(self) -> None:
        """Combine the rows of every process of a ``torch.distributed`` job (as moments)."""
        self._to_moments()
        if self.moments is not None:
            self.moments.all_reduce()

    def compute(
        self, n_components: int | None = None, level: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """Return ``(mean (D,), components (k, D), variances (k,), total variance)``, float64.

        Raises:
            ConfigError: When no rows were added.
        """
        if self.moments is None:
            if not self.rows:
                msg = "no training features were collected; give a non-empty train split"
                raise ConfigError(msg)
            rows = torch.cat(self.rows)
            mean, components, variances = pca_from_rows(rows, n_components, level)
            total = float(((rows.double() - mean) ** 2).sum()) / max(1, rows.shape[0] - 1)
            return mean, components, variances, total
        mean, covariance = self.moments.compute()
        components, variances = pca_from_covariance(covariance, n_components, level)
        return mean, components, variances, float(covariance.diagonal().sum())


_Choice = TypeVar("_Choice", bound=enum.StrEnum)


def check_choice(name: str, value: object, choices: type[_Choice]) -> _Choice:
    """Return ``value`` as a member of ``choices``, or raise ConfigError naming ``name``."""
    if isinstance(value, str) and value in {member.value for member in choices}:
        return choices(value)
    allowed = ", ".join(repr(member.value) for member in choices)
    msg = f"{name} must be one of {allowed}, got {value!r}"
    raise ConfigError(msg)
