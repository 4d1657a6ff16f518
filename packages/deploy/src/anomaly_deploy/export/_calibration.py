"""Calibration images for INT8 quantization: from a folder, a DataLoader or tensors."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from anomaly import ConfigError, DataError
from anomaly.io import image_to_tensor, is_image_file, read_image

__all__ = ["CalibrationSource", "calibration_images", "with_synthetic_defects"]

logger = logging.getLogger(__name__)

CalibrationSource = str | os.PathLike[str] | Iterable[object]
"""A folder of normal images, or an iterable of batches, dicts with ``image``, or tensors."""


def calibration_images(
    source: CalibrationSource, size: tuple[int, int], limit: int
) -> list[np.ndarray]:
    """Collect up to ``limit`` calibration images as (1, 3, H, W) float16 arrays in [0, 1].

    Images are kept in float16 to halve their memory; the exporter widens them to float32
    one at a time.

    Args:
        source: A folder (searched recursively; hidden files skipped) whose images are read
            and resized like training data to ``size``; or an iterable (a ``DataLoader`` of
            ``anomaly.Batch``, mappings with an ``"image"`` entry, or (B, 3, H, W) / (3, H, W)
            float tensors or arrays in [0, 1]), read only as far as needed.
        size: ``(height, width)`` folder images are resized to.
        limit: Most images to collect; a folder is sampled evenly when it holds more.

    Returns:
        At least one image.

    Raises:
        DataError: When the source is missing, holds no images, or an image cannot be read.
        ConfigError: When an item of an iterable is not an image batch.
    """
    if isinstance(source, str | os.PathLike):
        images = _from_folder(Path(source), size, limit)
    else:
        images = []
        for batch in _batches(source):
            for image in batch:
                images.append(image.unsqueeze(0).numpy().astype(np.float16))
                if len(images) >= limit:
                    break
            if len(images) >= limit:
                break
        if not images:
            msg = "the calibration data yielded no images; give it at least one batch of images"
            raise DataError(msg)
    logger.info("collected %d calibration images", len(images))
    return images


def _from_folder(root: Path, size: tuple[int, int], limit: int) -> list[np.ndarray]:
    if not root.exists():
        msg = f"calibration folder {str(root)!r} does not exist; pass a folder of normal images"
        raise DataError(msg)
    if root.is_file():
        paths = [root] if is_image_file(root) else []
    else:
        paths = sorted(
            path
            for path in root.rglob("*")
            if is_image_file(path)
            and not any(part.startswith(".") for part in path.relative_to(root).parts)
        )
    if not paths:
        msg = (
            f"calibration folder {str(root)!r} holds no images; pass a folder of normal "
            f"(good) training images"
        )
        raise DataError(msg)
    if len(paths) > limit:
        # Evenly spaced over the sorted list, so every subfolder contributes.
        chosen = np.unique(np.linspace(0, len(paths) - 1, limit).round().astype(int))
        paths = [paths[int(index)] for index in chosen]
    return [
        image_to_tensor(read_image(path), size).unsqueeze(0).numpy().astype(np.float16)
        for path in paths
    ]


def _batches(source: Iterable[object]) -> Iterator[torch.Tensor]:
    """Yield (B, 3, H, W) float tensors from the items of ``source``."""
    if isinstance(source, torch.Tensor | np.ndarray):
        source = [source]
    for index, item in enumerate(source):
        value = getattr(item, "image", None)
        if value is None and isinstance(item, Mapping):
            value = item.get("image")
        if value is None:
            value = item
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            msg = (
                f"calibration item {index} is a {type(value).__name__}, not a float image "
                f"tensor; give batches of (B, 3, H, W) images in [0, 1] or a folder of images"
            )
            raise ConfigError(msg)
        if value.ndim == 3:
            value = value.unsqueeze(0)
        if value.ndim != 4 or value.shape[1] != 3:
            msg = (
                f"calibration item {index} has shape {tuple(value.shape)}; give "
                f"(B, 3, H, W) or (3, H, W) RGB images in [0, 1]"
            )
            raise ConfigError(msg)
        yield value.detach().to("cpu", torch.float32)


def with_synthetic_defects(images: list[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    """Return ``images`` followed by one copy of each with two synthetic defects painted in.

    Quantization ranges come from the largest activations the calibration images produce.
    Normal images alone leave out the strong activations that defects cause, so those are
    clipped after quantization and anomalous images lose much of their score. Rectangles of
    black, white, a flat random colour or noise (up to half the image side) widen the
    ranges to cover them; normal images keep their accuracy.

    Args:
        images: (1, 3, H, W) arrays in [0, 1].
        seed: Seed of the defects' kinds, sizes and places.
    """
    rng = np.random.default_rng(seed)
    painted = []
    for index, image in enumerate(images):
        copy = image.copy()
        height, width = copy.shape[-2:]
        for part in range(2):
            kind = (index * 2 + part) % 4
            side_y = int(rng.integers(max(1, height // 8), max(2, height // 2)))
            side_x = int(rng.integers(max(1, width // 8), max(2, width // 2)))
            top = int(rng.integers(0, max(1, height - side_y)))
            left = int(rng.integers(0, max(1, width - side_x)))
            patch = copy[..., top : top + side_y, left : left + side_x]
            if kind == 0:
                patch[...] = 0.0
            elif kind == 1:
                patch[...] = 1.0
            elif kind == 2:
                patch[...] = rng.random((1, 3, 1, 1))
            else:
                patch[...] = rng.random(patch.shape)
        painted.append(copy)
    return [*images, *painted]
