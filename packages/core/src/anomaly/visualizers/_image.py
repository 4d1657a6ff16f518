"""``ImageVisualizer``: input, heat map, predicted outline and true mask side by side."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from anomaly._errors import ConfigError, DataError
from anomaly.visualizers._base import Visualizer

if TYPE_CHECKING:
    import torch

    from anomaly._batch import Batch

__all__ = ["ImageVisualizer", "PanelLayout", "jet_colormap"]

logger = logging.getLogger(__name__)

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
UInt8Image = npt.NDArray[np.uint8]

_BACKGROUND = (24, 24, 24)
_TEXT = (235, 235, 235)
_RED = (255, 0, 0)
_NO_DATA = (128, 128, 128)
_TITLES = ("image", "anomaly map", "prediction", "ground truth")


def jet_colormap(values: npt.NDArray[np.floating]) -> UInt8Image:
    """Colour values in [0, 1] blue (0) through cyan, green and yellow to red (1).

    The classic piecewise-linear "jet" ramp; values outside [0, 1] are clipped.

    Args:
        values: (H, W) floats.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    x = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)[..., None]
    # Each channel is a trapezoid centred at 3/4 (red), 1/2 (green) and 1/4 (blue).
    centres = np.array([0.75, 0.5, 0.25])
    rgb = np.clip(1.5 - np.abs(4.0 * (x - centres)), 0.0, 1.0)
    return np.asarray(np.round(rgb * 255.0), dtype=np.uint8)


@dataclass(frozen=True, slots=True)
class PanelLayout:
    """Where the four panels of one figure go, in pixels.

    Attributes:
        size: (width, height) of the whole figure.
        panel_size: (width, height) of each panel.
        origins: (x, y) of each panel's top-left corner, left to right.
        scale: Integer factor the image is enlarged by (nearest neighbour) to fill a panel.
        outline_width: Width of the predicted-mask outline in figure pixels.
        font_size: Size of the title and caption text.
    """

    size: tuple[int, int]
    panel_size: tuple[int, int]
    origins: tuple[tuple[int, int], ...]
    scale: int
    outline_width: int
    font_size: int


class ImageVisualizer(Visualizer):
    """One PNG per image: the input, a heat map, the predicted mask and the true mask.

    Panels, left to right: (1) the input image; (2) ``anomaly_map`` coloured blue to red and
    blended onto the image; (3) the image with the boundary of ``pred_mask`` drawn in red;
    (4) ``gt_mask`` white on black, or a grey "no mask" panel. A title sits above each panel
    and a caption below gives the score and the predicted and true labels.

    Maps are shown on an absolute scale: a post-processed ``anomaly_map`` lies in [0, 1] with
    the threshold at 0.5 (green), so a normal image stays blue. A map outside [0, 1] (not
    post-processed) is min-max scaled per image instead.

    Args:
        output_dir: Folder to write into; see ``Visualizer`` for the file names.
        alpha: Weight of the heat map in the blend, in [0, 1].
        min_panel_size: Images whose longer side is shorter are enlarged by an integer
            factor (nearest neighbour, so pixels stay sharp) until it is at least this long.
    """

    name: ClassVar[str] = "image"

    def __init__(
        self, output_dir: str | Path, *, alpha: float = 0.5, min_panel_size: int = 128
    ) -> None:
        super().__init__(output_dir)
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
            msg = f"visualizer.alpha must be a number in [0, 1], got {alpha!r}; use e.g. 0.5"
            raise ConfigError(msg)
        if isinstance(min_panel_size, bool) or not isinstance(min_panel_size, int):
            msg = f"visualizer.min_panel_size must be an integer, got {min_panel_size!r}"
            raise ConfigError(msg)
        if not 1 <= min_panel_size <= 4096:
            msg = f"visualizer.min_panel_size must lie in [1, 4096], got {min_panel_size!r}"
            raise ConfigError(msg)
        self.alpha = float(alpha)
        self.min_panel_size = min_panel_size

    def visualize(self, batch: Batch) -> list[Path]:
        """Write one PNG per image of a post-processed ``batch``.

        Returns:
            The written paths, in batch order.

        Raises:
            DataError: When a field of the batch does not have one entry per image.
        """
        paths = []
        for index in range(len(batch)):
            image_path = batch.image_path[index] if index < len(batch.image_path) else ""
            figure = self.render(batch, index)
            path = self.output_path(image_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            figure.save(path, format="PNG")
            paths.append(path)
        logger.debug("wrote %d figures under %s", len(paths), self.output_dir)
        return paths

    def layout(self, height: int, width: int) -> PanelLayout:
        """Return the layout of the figure for an image of ``height`` x ``width`` pixels."""
        scale = max(1, math.ceil(self.min_panel_size / max(height, width)))
        panel_w, panel_h = width * scale, height * scale
        font_size = min(24, max(10, min(panel_w, panel_h) // 16))
        line = _line_height(_font(font_size))
        margin, gap = 4, 4
        top = margin + line
        origins = tuple((margin + column * (panel_w + gap), top) for column in range(4))
        size = (2 * margin + 4 * panel_w + 3 * gap, top + panel_h + line + margin)
        return PanelLayout(
            size=size,
            panel_size=(panel_w, panel_h),
            origins=origins,
            scale=scale,
            outline_width=max(1, min(panel_w, panel_h) // 256),
            font_size=font_size,
        )

    def render(self, batch: Batch, index: int) -> Image.Image:
        """Return the figure of image ``index`` of ``batch`` as an RGB Pillow image.

        Raises:
            DataError: When the image is not (3, H, W) or (1, H, W).
        """
        image = _to_rgb(batch.image[index])
        height, width = image.shape[:2]
        layout = self.layout(height, width)
        font = _font(layout.font_size)

        def enlarge(array: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
            return np.repeat(np.repeat(array, layout.scale, axis=0), layout.scale, axis=1)

        panels: list[UInt8Image | str] = [enlarge(image).astype(np.uint8)]
        if batch.anomaly_map is not None:
            heat = jet_colormap(_unit_range(_field(batch.anomaly_map, index, height, width)))
            blend = (1.0 - self.alpha) * image + self.alpha * heat
            panels.append(enlarge(np.round(blend).astype(np.uint8)).astype(np.uint8))
        else:
            panels.append("no map")
        if batch.pred_mask is not None:
            mask = enlarge(_field(batch.pred_mask, index, height, width) > 0.5)
            outlined = enlarge(image).astype(np.uint8)
            outlined[_boundary(mask.astype(bool), layout.outline_width)] = _RED
            panels.append(outlined)
        else:
            panels.append("no mask")
        if batch.gt_mask is not None:
            truth = enlarge(_field(batch.gt_mask, index, height, width) > 0.5)
            panels.append(np.repeat(truth[..., None], 3, axis=2).astype(np.uint8) * 255)
        else:
            panels.append("no mask")

        figure = Image.new("RGB", layout.size, _BACKGROUND)
        draw = ImageDraw.Draw(figure)
        panel_w, panel_h = layout.panel_size
        line = _line_height(font)
        for (x, y), panel, title in zip(layout.origins, panels, _TITLES, strict=True):
            draw.text((x + 2, y - line + 2), _fit(draw, title, font, panel_w - 4), _TEXT, font)
            if isinstance(panel, str):
                draw.rectangle((x, y, x + panel_w - 1, y + panel_h - 1), fill=_NO_DATA)
                text = _fit(draw, panel, font, panel_w - 4)
                text_w = draw.textlength(text, font=font)
                position = (x + (panel_w - text_w) / 2, y + (panel_h - line) / 2)
                draw.text(position, text, _TEXT, font)
            else:
                figure.paste(Image.fromarray(panel), (x, y))
        x, y = layout.origins[0]
        caption = _fit(draw, _caption(batch, index, font), font, layout.size[0] - 2 * x)
        draw.text((x + 2, y + panel_h + 2), caption, _TEXT, font)
        return figure

    def __repr__(self) -> str:
        return (
            f"ImageVisualizer(output_dir={str(self.output_dir)!r}, alpha={self.alpha!r}, "
            f"min_panel_size={self.min_panel_size!r})"
        )


def _to_rgb(image: torch.Tensor) -> UInt8Image:
    """Turn a (3, H, W) or (1, H, W) float tensor in [0, 1] into (H, W, 3) uint8."""
    array = image.detach().cpu().float().numpy()
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        msg = f"image has shape {tuple(array.shape)!r}; the visualizer expects (3, H, W) in [0, 1]"
        raise DataError(msg)
    array = np.nan_to_num(np.clip(array, 0.0, 1.0), nan=0.0)
    rgb = np.repeat(array, 3, axis=0) if array.shape[0] == 1 else array
    return np.asarray(np.round(rgb.transpose(1, 2, 0) * 255.0), dtype=np.uint8)


def _field(values: torch.Tensor, index: int, height: int, width: int) -> npt.NDArray[np.float32]:
    """Return entry ``index`` of a (B, H', W') or (B, 1, H', W') field at the image's size."""
    if values.ndim == 4 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 3 or index >= values.shape[0]:
        msg = (
            f"a map or mask of shape {tuple(values.shape)!r} has no entry {index}; "
            "expected (B, H, W) with one entry per image"
        )
        raise DataError(msg)
    array = np.asarray(values[index].detach().cpu().float().numpy(), dtype=np.float32)
    if array.shape != (height, width):
        # Bilinear for maps, then thresholded at 0.5 for masks: edges land mid-pixel.
        resized = Image.fromarray(array).resize((width, height), Image.Resampling.BILINEAR)
        array = np.asarray(resized, dtype=np.float32)
    return array


def _unit_range(values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    values = np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= 1.0:
        return values
    return (values - low) / max(high - low, float(np.finfo(np.float32).eps))


def _boundary(mask: npt.NDArray[np.bool_], width: int) -> npt.NDArray[np.bool_]:
    """Mask pixels within ``width`` of the outside (8-connected); the frame counts as outside."""
    inner = ndimage.binary_erosion(
        mask, structure=np.ones((3, 3), dtype=bool), iterations=width, border_value=0
    )
    return np.asarray(mask & ~inner, dtype=bool)


def _caption(batch: Batch, index: int, font: Font) -> str:
    """Return e.g. ``score 0.83 · anomalous · truth: normal · crack/000.png``."""
    parts = []
    if batch.pred_score is not None:
        parts.append(f"score {float(batch.pred_score.reshape(-1)[index]):.2f}")
    if batch.pred_label is not None:
        parts.append(_label_name(int(batch.pred_label.reshape(-1)[index])))
    if batch.gt_label is not None:
        parts.append(f"truth: {_label_name(int(batch.gt_label.reshape(-1)[index]))}")
    if index < len(batch.image_path) and batch.image_path[index]:
        source = PurePosixPath(batch.image_path[index].replace("\\", "/"))
        parts.append(f"{source.parent.name}/{source.name}" if source.parent.name else source.name)
    # The middle dot needs a TrueType font; Pillow's bitmap fallback has ASCII only.
    separator = " · " if isinstance(font, ImageFont.FreeTypeFont) else " | "
    return separator.join(parts) if parts else "no prediction"


def _label_name(label: int) -> str:
    return "anomalous" if label else "normal"


def _font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _line_height(font: Font) -> int:
    return int(font.getbbox("Ag")[3]) + 4


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Font, width: float) -> str:
    """Shorten ``text`` with an ellipsis until it is at most ``width`` pixels long."""
    if draw.textlength(text, font=font) <= width:
        return text
    ellipsis = "…" if isinstance(font, ImageFont.FreeTypeFont) else "..."
    while text and draw.textlength(text + ellipsis, font=font) > width:
        text = text[:-1]
    return text + ellipsis if text else ""
