"""The built-in ``checkpoint`` exporter: a state dict plus ``metadata.json``, no pickled code."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from anomaly import __version__
from anomaly._errors import ExportError
from anomaly._module import AnomalyModule
from anomaly._plugins import PluginManager

__all__ = ["METADATA_SCHEMA_VERSION", "export_checkpoint", "export_metadata"]

METADATA_SCHEMA_VERSION = 1


def export_metadata(
    model: AnomalyModule, model_name: str, fmt: str, model_file: str
) -> dict[str, Any]:
    """Describe an export: what an inferencer needs besides the model file."""
    post = model.post_processor
    height, width = model.input_size or (0, 0)
    return {
        "schema_version": METADATA_SCHEMA_VERSION,
        "format": fmt,
        "model": model_name,
        "model_file": model_file,
        "input": {
            "height": height,
            "width": width,
            "channels": "RGB",
            "range": [0.0, 1.0],
            "resize": "bilinear",
            "normalization": "inside the model",
        },
        "outputs": ["pred_score", "anomaly_map"],
        "post_processing": {
            "image_threshold": float(post.image_threshold),
            "pixel_threshold": float(post.pixel_threshold),
            "image_min": float(post.image_min),
            "image_max": float(post.image_max),
            "pixel_min": float(post.pixel_min),
            "pixel_max": float(post.pixel_max),
            "normalized_threshold": 0.5,
        },
        "versions": {
            "anomaly_core": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }


def export_checkpoint(
    model: AnomalyModule,
    directory: Path,
    *,
    plugin_manager: PluginManager | None = None,
    **options: Any,
) -> Path:
    """Write ``model.pt`` (a ``weights_only`` checkpoint) and ``metadata.json`` into ``directory``.

    Load it with ``anomaly.Engine().load_model(directory)``.

    Raises:
        ExportError: On an unknown option or when the model lacks an input size.
    """
    from anomaly._engine import Engine

    if options:
        msg = f"the checkpoint exporter takes no options, got {sorted(options)!r}"
        raise ExportError(msg)
    if model.input_size is None:
        msg = "the model has no input size; fit it or load a fitted checkpoint before exporting"
        raise ExportError(msg)
    engine = Engine(plugin_manager=plugin_manager)
    directory.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(model, directory / "model.pt")
    metadata = export_metadata(model, engine.model_name(model), "checkpoint", "model.pt")
    (directory / "metadata.json").write_text(
        json.dumps(metadata, indent=2) + "\n", encoding="utf-8"
    )
    return directory
