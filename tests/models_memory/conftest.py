"""Small synthetic textures with and without a defect blob, shared by the memory-model tests."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

SIZE = 64


def texture(generator: torch.Generator, size: int = SIZE) -> torch.Tensor:
    """Return a (3, size, size) striped texture in [0, 1] with a random phase and mild noise."""
    x = torch.arange(size).expand(size, size)
    phase = float(torch.rand(1, generator=generator)) * 2 * math.pi
    stripes = 0.5 + 0.25 * torch.sin(2 * math.pi * x / 8 + phase)
    noise = 0.03 * torch.randn(size, size, generator=generator)
    gray = (stripes + noise).clamp(0, 1)
    return torch.stack([gray, gray * 0.9, gray * 0.8])


def with_blob(image: torch.Tensor, center: tuple[int, int], radius: int = 8) -> torch.Tensor:
    """Return a copy of ``image`` with a dark square blob (the defect) at ``center``."""
    out = image.clone()
    row, col = center
    out[:, row - radius : row + radius, col - radius : col + radius] = 0.05
    return out


@pytest.fixture(scope="session")
def textures() -> dict[str, torch.Tensor]:
    """Train images, normal test images and defective test images with their blob centers."""
    generator = torch.Generator().manual_seed(0)
    train = torch.stack([texture(generator) for _ in range(12)])
    normal = torch.stack([texture(generator) for _ in range(4)])
    # Blobs stay clear of the borders: on 64 px images the deeper levels see the whole image.
    centers = [(24, 24), (40, 24), (24, 40), (40, 40)]
    defective = torch.stack([with_blob(texture(generator), center) for center in centers])
    return {
        "train": train,
        "normal": normal,
        "defective": defective,
        "centers": torch.tensor(centers),
    }


def _assert_peaks_on_blobs(maps: torch.Tensor, centers: torch.Tensor, radius: int = 8) -> None:
    peaks = maps.flatten(1).argmax(dim=1)
    peak_rc = torch.stack([peaks // maps.shape[-1], peaks % maps.shape[-1]], dim=1)
    # Within the 16 px blob grown by half a stride-8 cell.
    assert int((peak_rc - centers).abs().max()) <= radius + 4
    for anomaly_map, (row, col) in zip(maps, centers.tolist(), strict=True):
        inside = torch.zeros_like(anomaly_map, dtype=torch.bool)
        inside[row - radius : row + radius, col - radius : col + radius] = True
        assert float(anomaly_map[inside].mean()) > float(anomaly_map[~inside].mean())


@pytest.fixture
def assert_peaks_on_blobs() -> Callable[[torch.Tensor, torch.Tensor], None]:
    """Check that each map peaks on its blob and is higher inside the blob than outside."""
    return _assert_peaks_on_blobs
