"""Fixtures of the anomaly-data tests: tiny image folders written on the fly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

WriteImage = Callable[..., Path]


def _write(
    path: Path,
    size: tuple[int, int] = (40, 48),
    *,
    mode: str = "RGB",
    seed: int = 0,
    mask: bool = False,
) -> Path:
    """Write an image (or a mask with a filled square) of ``size`` = (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    rng = np.random.default_rng(seed)
    if mask:
        array = np.zeros((height, width), dtype=np.uint8)
        array[height // 4 : height // 2, width // 4 : width // 2] = 255
        Image.fromarray(array).save(path)
        return path
    rgb = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    if mode == "I;16":
        gray = (rng.integers(0, 65536, size=(height, width))).astype(np.uint16)
        image = Image.fromarray(gray)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


@pytest.fixture
def write_image() -> WriteImage:
    """Return a function writing a random image, or a square mask with ``mask=True``."""
    return _write


@pytest.fixture
def defect_folder(tmp_path: Path) -> Path:
    """A Folder dataset: 20 normal images, 'crack' (4) and 'hole' (3) with masks in masks/."""
    root = tmp_path / "data"
    for index in range(20):
        _write(root / "good" / f"g{index:02d}.png", seed=index)
    for defect, count in (("crack", 4), ("hole", 3)):
        for index in range(count):
            _write(root / defect / f"{defect}{index}.png", seed=100 + index)
            # Both naming schemes: "<stem>_mask.png" for crack, "<stem>.png" for hole.
            name = f"{defect}{index}_mask.png" if defect == "crack" else f"{defect}{index}.png"
            _write(root / "masks" / defect / name, mask=True)
    return root
