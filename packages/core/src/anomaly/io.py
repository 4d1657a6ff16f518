"""Read images and masks the same way everywhere: datamodules, prediction, visualizers.

Every common format Pillow reads is accepted. Grayscale, palette, RGBA and 16-bit images are
converted to 8-bit RGB; a transparent background becomes black.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from anomaly._errors import DataError

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGE_EXTENSIONS",
    "image_to_tensor",
    "is_image_file",
    "mask_to_tensor",
    "read_image",
    "read_mask",
    "to_rgb",
]

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}
)


def is_image_file(path: Path) -> bool:
    """Return True for visible files with an image extension (``.PNG`` counts)."""
    return (
        path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def _open(path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
            # Phone and camera photos store their rotation in EXIF; show them upright, as
            # the deploy inferencers do, so training and deployment see the same pixels.
            image = ImageOps.exif_transpose(image)
    except FileNotFoundError as err:
        msg = f"image file {str(path)!r} does not exist; check the path"
        raise DataError(msg) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        msg = f"image file {str(path)!r} cannot be read ({err}); re-save it or remove it"
        raise DataError(msg) from err
    return image


def to_rgb(image: Image.Image) -> np.ndarray:
    """Convert any Pillow image to an (H, W, 3) uint8 RGB array.

    16-bit and 32-bit images are scaled by their bit depth (not their value range, so
    brightness is kept); alpha is composited onto black.
    """
    if image.mode in {"I;16", "I;16B", "I;16L", "I;16N", "I"}:
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        peak = 1.0 if array.max() <= 1.0 else 255.0
        gray = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode in {"RGBA", "LA", "PA"} or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        composited: np.ndarray = np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
        return composited
    rgb: np.ndarray = np.asarray(image.convert("RGB"))
    return rgb


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as an (H, W, 3) uint8 RGB array.

    Raises:
        DataError: When the file is missing or cannot be decoded.
    """
    return to_rgb(_open(Path(path)))


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask file as an (H, W) bool array: True where the pixel value is above half.

    Raises:
        DataError: When the file is missing or cannot be decoded.
    """
    image = _open(Path(path))
    if image.mode in {"RGBA", "LA"}:
        image = image.convert("RGBA").getchannel("A") if image.mode == "LA" else image
    mask: np.ndarray = to_rgb(image).max(axis=2) > 127
    return mask


def image_to_tensor(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Resize an (H, W, 3) uint8 image (bilinear, antialiased) to a (3, h, w) float tensor.

    Every path into a model (training data, prediction on files or arrays) resizes through
    this function, so a model sees the same pixels at training and at prediction time.

    Args:
        image: (H, W, 3) uint8 RGB.
        size: ``(height, width)`` of the result.

    Returns:
        (3, height, width) float32 in [0, 1].
    """
    import torch

    height, width = size
    resized = Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(resized, dtype=np.float32) / 255.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def mask_to_tensor(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Resize an (H, W) bool mask (nearest neighbour) to an (h, w) bool tensor."""
    import torch

    height, width = size
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(
        (width, height), Image.Resampling.NEAREST
    )
    return torch.from_numpy(np.asarray(resized) > 127)
