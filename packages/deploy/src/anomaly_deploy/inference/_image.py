"""Decode images and arrays to (H, W, 3) uint8 RGB, and resize images and maps with Pillow.

The conversions mirror core's ``anomaly.io`` (which this package may not import): 16-bit and
32-bit images are scaled by their bit depth, alpha is composited onto black, and resizing
uses Pillow's bilinear filter (antialiased when shrinking), as the training data path does.
Unlike ``anomaly.io.read_image`` the EXIF orientation is applied, so a photo is scored the
way every viewer shows it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from anomaly_deploy.errors import InputError

__all__ = [
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "array_to_rgb",
    "is_image_file",
    "read_image",
    "resize_image",
    "resize_map",
    "to_rgb",
]

UInt8Image = npt.NDArray[np.uint8]

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}
)
VIDEO_EXTENSIONS = frozenset(
    {".avi", ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv"}
)


def is_image_file(path: Path) -> bool:
    """Return True for visible files with an image extension (``.PNG`` counts)."""
    return (
        path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def to_rgb(image: Image.Image) -> UInt8Image:
    """Convert any Pillow image to an (H, W, 3) uint8 RGB array.

    16-bit and 32-bit images are scaled by their bit depth (not their value range, so
    brightness is kept); alpha is composited onto black.
    """
    if image.mode in {"I;16", "I;16B", "I;16L", "I;16N", "I"}:
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return _gray_to_rgb(array, peak)
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        return _gray_to_rgb(array, 1.0 if array.max() <= 1.0 else 255.0)
    if image.mode in {"RGBA", "LA", "PA"} or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _gray_to_rgb(array: npt.NDArray[np.float64], peak: float) -> UInt8Image:
    gray = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def read_image(path: str | os.PathLike[str]) -> UInt8Image:
    """Read an image file as an (H, W, 3) uint8 RGB array, upright by its EXIF orientation.

    Raises:
        InputError: When the file is missing or cannot be decoded.
    """
    try:
        with warnings.catch_warnings():
            # Large inspection images are legitimate; the size limit targets web uploads.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)
                return to_rgb(image)
    except FileNotFoundError as err:
        msg = f"image file {os.fspath(path)!r} does not exist; check the path"
        raise InputError(msg) from err
    except IsADirectoryError as err:
        msg = f"{os.fspath(path)!r} is a folder, not an image; pass it as the source instead"
        raise InputError(msg) from err
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        OSError,
        SyntaxError,
        ValueError,
    ) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        msg = f"image file {os.fspath(path)!r} cannot be read ({reason}); re-save it or remove it"
        raise InputError(msg) from err


def array_to_rgb(array: object) -> UInt8Image:
    """Turn an (H, W), (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA array into (H, W, 3) uint8.

    uint8 arrays are taken as they are; uint16 arrays are scaled by their bit depth.

    Raises:
        InputError: On any other shape or dtype.
    """
    if not isinstance(array, np.ndarray):
        msg = (
            f"expected a numpy array, got {type(array).__name__!r}; "
            "pass an (H, W, 3) uint8 RGB array"
        )
        raise InputError(msg)
    shape = array.shape
    channels = 1 if array.ndim == 2 else (shape[2] if array.ndim == 3 else 0)
    if channels not in (1, 3, 4) or array.dtype not in (np.uint8, np.uint16) or 0 in shape:
        msg = (
            f"cannot use an array of shape {shape!r} and dtype {str(array.dtype)!r} as an image; "
            "pass (H, W, 3) uint8 RGB, (H, W) grayscale or (H, W, 4) RGBA"
        )
        raise InputError(msg)
    if array.dtype == np.uint16:
        array = np.clip(array.astype(np.float64) / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if channels == 3:
        return np.ascontiguousarray(array, dtype=np.uint8)
    if channels == 1:
        gray = array.reshape(shape[0], shape[1])
        return np.repeat(gray[..., None], 3, axis=2)
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)))


def resize_image(image: UInt8Image, size: tuple[int, int]) -> UInt8Image:
    """Resize (H, W, 3) uint8 to ``size`` = (height, width) as the training data path does."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    resized = Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def resize_map(values: npt.NDArray[np.float32], size: tuple[int, int]) -> npt.NDArray[np.float32]:
    """Resize an (h, w) float32 map to ``size`` = (height, width), bilinear."""
    height, width = size
    if values.shape == (height, width):
        return values
    resized = Image.fromarray(np.asarray(values, dtype=np.float32)).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.float32)
