"""What the HTTP API and the Gradio page share: the inferencer interface, decoding, rendering.

Torch-free on purpose: numpy and Pillow only, so a serving machine needs no training stack.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "HEATMAP_ALPHA",
    "ImageDecodeError",
    "ImageTooLargeError",
    "InferencerLike",
    "NotAnImageError",
    "PredictionLike",
    "decode_image",
    "encode_png",
    "heatmap_overlay",
    "input_error_types",
    "mask_image",
    "model_info",
    "verdict",
]

DEFAULT_MAX_PIXELS = 50_000_000
"""Largest decoded image accepted (width x height); 50 MP covers industrial cameras.

A small compressed file can expand to gigabytes of pixels, so the decoded size is checked from
the header before any pixel is decoded.
"""

HEATMAP_ALPHA = 0.5
"""Weight of the heat map when blended onto the image (the visualizer's default too)."""


class PredictionLike(Protocol):
    """The fields of ``anomaly_deploy.inference.Prediction`` that serving reads."""

    @property
    def pred_score(self) -> float:
        """Normalized image score in [0, 1]; anomalous from 0.5."""

    @property
    def pred_label(self) -> bool:
        """True when the image is anomalous."""

    @property
    def anomaly_map(self) -> npt.NDArray[np.floating[Any]]:
        """(H, W) float32 in [0, 1] at the input image's size."""

    @property
    def pred_mask(self) -> npt.NDArray[np.bool_]:
        """(H, W) bool, the anomaly map thresholded at 0.5."""


class InferencerLike(Protocol):
    """What serving needs from an inferencer: ``predict`` on an RGB array and its metadata."""

    @property
    def metadata(self) -> Mapping[str, Any]:
        """The export's ``metadata.json``."""

    def predict(self, image: npt.NDArray[np.uint8]) -> PredictionLike:
        """Score one (H, W, 3) uint8 RGB image."""


class ImageDecodeError(ValueError):
    """Uploaded bytes look like an image but cannot be decoded (truncated, corrupt)."""


class NotAnImageError(ImageDecodeError):
    """Uploaded bytes are empty or in no image format Pillow knows."""


class ImageTooLargeError(ImageDecodeError):
    """The decoded image would have more pixels than allowed."""


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> npt.NDArray[np.uint8]:
    """Decode image file bytes in memory to an (H, W, 3) uint8 RGB array.

    Conversions match how training reads files (``anomaly.io.read_image``): grayscale and
    palette become RGB, 16-bit images are scaled by their bit depth, alpha is composited onto
    black, and EXIF orientation is applied (as training and the inferencers do), so the model
    sees the pixels it was trained on.

    Args:
        data: The bytes of an image file (PNG, JPEG, BMP, TIFF, WebP, ...).
        max_pixels: Largest width x height accepted.

    Returns:
        (H, W, 3) uint8 RGB.

    Raises:
        NotAnImageError: When ``data`` is empty or not in a known image format.
        ImageTooLargeError: When the image has more than ``max_pixels`` pixels.
        ImageDecodeError: When the image is truncated or corrupt.
    """
    if not data:
        msg = "the uploaded file is empty; send the bytes of an image file"
        raise NotAnImageError(msg)
    try:
        # Image.open reads the header only, so the size is checked before any pixel is decoded.
        # (No warnings.catch_warnings here: it is not thread-safe, and this runs in a pool.)
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            msg = (
                f"the image is {width} x {height} pixels, more than the {max_pixels} "
                f"allowed; send a smaller image"
            )
            raise ImageTooLargeError(msg)
        image.load()
        return _to_rgb(ImageOps.exif_transpose(image))
    except UnidentifiedImageError as err:
        msg = "the upload is not an image in a known format; send a PNG, JPEG, BMP, TIFF or WebP"
        raise NotAnImageError(msg) from err
    except Image.DecompressionBombError as err:
        msg = f"the image is too large to decode ({err}); send a smaller image"
        raise ImageTooLargeError(msg) from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        if isinstance(err, ImageDecodeError):
            raise
        msg = f"the image cannot be decoded ({err}); re-save it and upload it again"
        raise ImageDecodeError(msg) from err


def _to_rgb(image: Image.Image) -> npt.NDArray[np.uint8]:
    if image.mode in {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}:
        array = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            peak = 1.0 if array.max() <= 1.0 else 255.0
        else:
            peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode in {"RGBA", "LA", "PA", "La", "RGBa"} or (
        image.mode == "P" and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _jet(values: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
    """Colour [0, 1] blue through cyan, green and yellow to red, as core's figures do."""
    x = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0)[..., None]
    # Each channel is a trapezoid centred at 3/4 (red), 1/2 (green) and 1/4 (blue).
    ramps = np.clip(1.5 - np.abs(4.0 * (x - np.array([0.75, 0.5, 0.25]))), 0.0, 1.0)
    return np.asarray(ramps * 255.0, dtype=np.float64)


def heatmap_overlay(
    image: npt.NDArray[np.uint8],
    anomaly_map: npt.NDArray[np.floating[Any]],
    *,
    alpha: float = HEATMAP_ALPHA,
) -> npt.NDArray[np.uint8]:
    """Blend the jet-coloured anomaly map onto the image.

    Args:
        image: (H, W, 3) uint8 RGB.
        anomaly_map: (H, W) float in [0, 1], 0.5 being the threshold.
        alpha: Weight of the heat map in [0, 1].

    Returns:
        (H, W, 3) uint8 RGB.
    """
    if anomaly_map.shape != image.shape[:2]:
        # The contract gives maps at the image's size; resize defensively rather than fail.
        resized = Image.fromarray(np.asarray(anomaly_map, dtype=np.float32)).resize(
            (image.shape[1], image.shape[0]), Image.Resampling.BILINEAR
        )
        anomaly_map = np.asarray(resized, dtype=np.float32)
    blend = (1.0 - alpha) * image.astype(np.float64) + alpha * _jet(anomaly_map)
    return np.asarray(np.clip(np.round(blend), 0, 255), dtype=np.uint8)


def mask_image(pred_mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint8]:
    """Return the predicted mask as an (H, W) uint8 image: 255 anomalous, 0 normal."""
    return np.where(np.asarray(pred_mask, dtype=bool), 255, 0).astype(np.uint8)


def encode_png(array: npt.NDArray[np.uint8]) -> bytes:
    """Encode an (H, W) or (H, W, 3) uint8 array as PNG bytes (fast, light compression)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def verdict(prediction: PredictionLike) -> str:
    """Return ``"anomalous"`` or ``"normal"``."""
    return "anomalous" if bool(prediction.pred_label) else "normal"


def input_error_types() -> tuple[type[Exception], ...]:
    """The inferencer's error for unusable input images, to answer it as the client's fault."""
    try:
        from anomaly_deploy.errors import InputError
    except ImportError:  # an inference package without its own error types
        return ()
    return (InputError,)


def model_info(metadata: Mapping[str, Any]) -> dict[str, str]:
    """Name, format and precision of an export, read from its metadata (``"unknown"`` if absent)."""
    return {key: str(metadata.get(key) or "unknown") for key in ("model", "format", "precision")}
