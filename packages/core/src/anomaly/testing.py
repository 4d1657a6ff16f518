"""Helpers and pytest fixtures for testing anomaly and its plugins.

``make_synthetic_mvtec`` writes a small, seeded dataset in the MVTec AD layout; it needs only
numpy and Pillow. The fixtures are opt-in, from a top-level ``conftest.py``::

    pytest_plugins = ["anomaly.testing"]

``synthetic_mvtec`` (session scope) returns the root of such a dataset with the category
``widget``: 16 training images, 6 normal and 6 anomalous test images, 64 x 64, with masks.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["SYNTHETIC_DEFECTS", "make_synthetic_mvtec"]

SYNTHETIC_DEFECTS = ("bright", "dark")
"""The defect folders ``make_synthetic_mvtec`` writes: a light and a dark blob."""


def make_synthetic_mvtec(
    root: Path,
    *,
    category: str = "widget",
    size: int = 64,
    n_train: int = 16,
    n_good_test: int = 6,
    n_defect_test: int = 6,
    seed: int = 0,
) -> Path:
    """Write a seeded dataset in the MVTec AD layout and return its category folder.

    Normal images are a smooth random texture with fine stripes; each anomalous image adds
    one bright or dark elliptic blob (alternating, so ``n_defect_test`` is split over
    ``test/bright`` and ``test/dark``), whose mask is written to
    ``ground_truth/<defect>/<stem>_mask.png``. All files are 8-bit RGB (masks grayscale) PNGs.

    Args:
        root: Folder the category folder is created in.
        category: Name of the category folder.
        size: Side of the square images, in pixels (at least 16).
        n_train: Normal training images.
        n_good_test: Normal test images.
        n_defect_test: Anomalous test images, over both defect types.
        seed: Seed; the same arguments always give the same bytes.

    Returns:
        ``root / category``.
    """
    if size < 16:
        msg = f"size must be at least 16 pixels, got {size!r}"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    category_dir = Path(root) / category

    def write(relative: str, array: np.ndarray) -> None:
        path = category_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)

    for index in range(n_train):
        write(f"train/good/{index:03d}.png", _to_uint8(_texture(rng, size)))
    for index in range(n_good_test):
        write(f"test/good/{index:03d}.png", _to_uint8(_texture(rng, size)))
    counters = dict.fromkeys(SYNTHETIC_DEFECTS, 0)
    for index in range(n_defect_test):
        defect = SYNTHETIC_DEFECTS[index % len(SYNTHETIC_DEFECTS)]
        stem = f"{counters[defect]:03d}"
        counters[defect] += 1
        image = _texture(rng, size)
        mask = _blob(rng, size)
        image[mask] = 0.95 if defect == "bright" else 0.05
        write(f"test/{defect}/{stem}.png", _to_uint8(image))
        write(f"ground_truth/{defect}/{stem}_mask.png", mask.astype(np.uint8) * 255)
    return category_dir


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random texture with stripes, (size, size, 3) float in [0.25, 0.75]."""
    coarse = rng.normal(0.0, 1.0, size=(size // 8 + 2, size // 8 + 2))
    # Upsample the coarse noise by 8 with a separable linear interpolation: smooth blotches.
    grid = np.linspace(0, coarse.shape[0] - 1.0001, size)
    low = grid.astype(int)
    frac = grid - low
    rows = coarse[low] * (1 - frac)[:, None] + coarse[low + 1] * frac[:, None]
    smooth = rows[:, low] * (1 - frac)[None, :] + rows[:, low + 1] * frac[None, :]
    phase = rng.uniform(0, 2 * np.pi)
    stripes = np.sin(np.arange(size) * 2 * np.pi / 6 + phase)[None, :]
    gray = 0.5 + 0.06 * smooth + 0.05 * stripes + rng.normal(0.0, 0.015, size=(size, size))
    tint = np.array([1.0, 0.96, 0.9])
    texture: np.ndarray = np.clip(gray[..., None] * tint, 0.25, 0.75)
    return texture


def _blob(rng: np.random.Generator, size: int) -> np.ndarray:
    """An elliptic blob well inside the image, (size, size) bool, never empty."""
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = rng.uniform(size * 0.3, size * 0.7, size=2)
    ry, rx = rng.uniform(size * 0.08, size * 0.18, size=2)
    mask: np.ndarray = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return mask


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)


# The fixtures exist only where pytest is installed; the helpers above work without it.
if importlib.util.find_spec("pytest") is not None:
    import pytest

    __all__ += ["synthetic_mvtec"]

    @pytest.fixture(scope="session")
    def synthetic_mvtec(tmp_path_factory: pytest.TempPathFactory) -> Path:
        """Return the root of a synthetic MVTec-layout dataset with the category ``widget``."""
        root = tmp_path_factory.mktemp("synthetic_mvtec")
        make_synthetic_mvtec(root)
        return root
