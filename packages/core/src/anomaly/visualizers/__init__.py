"""Visualizers: pictures of predictions, one file per image.

``Visualizer`` is the base class (safe output names under one folder); ``ImageVisualizer``
writes a PNG with the input, a heat map, the predicted outline and the true mask.
"""

from __future__ import annotations

from anomaly.visualizers._base import Visualizer
from anomaly.visualizers._image import ImageVisualizer, PanelLayout, jet_colormap

__all__ = ["ImageVisualizer", "PanelLayout", "Visualizer", "jet_colormap"]
