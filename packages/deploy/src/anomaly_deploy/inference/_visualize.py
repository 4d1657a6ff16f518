"""Pictures of predictions with numpy and Pillow alone: heat-map overlay, mask outline, verdict."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from anomaly_deploy.inference._base import Prediction
from anomaly_deploy.inference._image import UInt8Image

__all__ = ["JET", "colorize", "outline", "overlay", "render"]

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def _jet() -> UInt8Image:
    """Build the 256-entry "jet" table: blue (0), cyan, green, yellow, red (1).

    Each channel is a trapezoid centred at 3/4 (red), 1/2 (green) and 1/4 (blue): the ramp
    core's image visualizer draws, so both paths colour maps alike.
    """
    x = np.linspace(0.0, 1.0, 256)[:, None]
    rgb = np.clip(1.5 - np.abs(4.0 * (x - np.array([0.75, 0.5, 0.25]))), 0.0, 1.0)
    return np.asarray(np.round(rgb * 255.0), dtype=np.uint8)


JET: UInt8Image = _jet()
_RED = (255, 0, 0)
_TEXT = (255, 255, 255)
_BANNER = {True: (190, 30, 30), False: (30, 130, 60)}


def colorize(anomaly_map: npt.NDArray[np.floating]) -> UInt8Image:
    """Colour an (H, W) map in [0, 1] with ``JET`` (values outside are clipped; NaN is 0).

    Returns:
        (H, W, 3) uint8 RGB.
    """
    values = np.nan_to_num(np.asarray(anomaly_map, dtype=np.float32), nan=0.0)
    index = np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.intp)
    return JET[index]


def overlay(
    image: UInt8Image, anomaly_map: npt.NDArray[np.floating], alpha: float = 0.5
) -> UInt8Image:
    """Blend the coloured map over an (H, W, 3) uint8 image; ``alpha`` is the map's weight."""
    blend = (1.0 - alpha) * image.astype(np.float32) + alpha * colorize(anomaly_map)
    return np.asarray(np.round(blend), dtype=np.uint8)


def outline(mask: npt.NDArray[np.bool_], width: int = 1) -> npt.NDArray[np.bool_]:
    """Return the pixels of ``mask`` within ``width`` of its outside (8-connected).

    The image border counts as outside, so a mask touching the edge is closed there.
    """
    inner = np.asarray(mask, dtype=bool)
    for _ in range(max(1, width)):
        padded = np.pad(inner, 1, constant_values=False)
        eroded = np.ones_like(inner)
        height, width_ = inner.shape
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                eroded &= padded[dy : dy + height, dx : dx + width_]
        inner = eroded
    boundary: npt.NDArray[np.bool_] = np.asarray(mask, dtype=bool) & ~inner
    return boundary


def render(prediction: Prediction, *, alpha: float = 0.5, min_panel_size: int = 128) -> UInt8Image:
    """Draw a prediction: verdict banner over the image with the predicted outline and the heat map.

    Small images are enlarged by a whole factor (nearest neighbour) so each panel is at least
    ``min_panel_size`` pixels on its longer side.

    Returns:
        (banner + s*H, 2*s*W + 4, 3) uint8 RGB, ``s`` the enlargement factor: left the input
        with the predicted mask outlined in red, right the heat map blended over it.
    """
    image = prediction.image
    height, width = image.shape[:2]
    scale = max(1, math.ceil(min_panel_size / max(height, width)))
    heat = overlay(image, prediction.anomaly_map, alpha)
    outlined = image.copy()
    outlined[outline(prediction.pred_mask, max(1, min(height, width) // 256))] = _RED
    panels = [np.repeat(np.repeat(p, scale, axis=0), scale, axis=1) for p in (outlined, heat)]
    panel_h, panel_w = panels[0].shape[:2]
    font = _font(min(24, max(10, min(panel_h, panel_w) // 12)))
    banner = int(font.getbbox("Ag")[3]) + 8
    gap = 4
    figure = Image.new("RGB", (2 * panel_w + gap, banner + panel_h), _BANNER[prediction.pred_label])
    for index, panel in enumerate(panels):
        figure.paste(Image.fromarray(panel), (index * (panel_w + gap), banner))
    verdict = "ANOMALOUS" if prediction.pred_label else "NORMAL"
    text = f"{verdict}  score {prediction.pred_score:.2f}  {prediction.source}"
    draw = ImageDraw.Draw(figure)
    draw.text((4, 4), _fit(draw, text, font, figure.width - 8), _TEXT, font)
    return np.asarray(figure, dtype=np.uint8)


def _font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Font, width: float) -> str:
    """Shorten ``text`` with '...' until it is at most ``width`` pixels long."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..." if text else ""
