"""Export a self-contained ``torch.export`` program (``model.pt2``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch

from anomaly import AnomalyModule, PluginManager
from anomaly_deploy.export._common import (
    check_options,
    check_output_folder,
    check_precision,
    compare,
    metadata,
    model_name,
    reference_outputs,
    staging,
    verification_input,
    write_metadata,
)
from anomaly_deploy.export._graph import InferenceGraph, export_ready, trace

__all__ = ["export_torch"]

logger = logging.getLogger(__name__)

# The exported program runs the same kernels as the model; only fusion order may differ.
FP32_TOLERANCE = 1e-5


def export_torch(
    model: AnomalyModule,
    directory: str | Path,
    *,
    plugin_manager: PluginManager | None = None,
    precision: Literal["fp32"] = "fp32",
    **options: Any,
) -> Path:
    """Write ``model.pt2`` (``torch.export.save``) and ``metadata.json`` into ``directory``.

    Load it with ``torch.export.load(path).module()``: a module taking ``image`` (N, 3, H, W)
    float32 RGB in [0, 1] with any N, H and W and returning ``(pred_score, pred_label,
    anomaly_map, pred_mask)``, resizing and post-processing included; no anomaly code is
    needed to run it. The program is checked against the model on a batch of another size
    before the folder is written.

    Args:
        model: A fitted model.
        directory: Export folder; created, and must be empty if it exists.
        plugin_manager: Where the model's registry name is looked up.
        precision: ``"fp32"`` only.
        **options: None are accepted; any raises ``ExportError``.

    Returns:
        ``directory``.

    Raises:
        ExportError: On an unknown option, a model that is not fitted, or code that
            ``torch.export`` cannot trace for every size (named in the message).
        ConfigError: On an unsupported precision.
    """
    check_options("torch", options, ["precision"])
    chosen = check_precision("torch", precision, ["fp32"])
    target = check_output_folder(directory)
    name = model_name(model, plugin_manager)
    with export_ready(model), staging(target) as folder:
        graph = InferenceGraph(model)
        program = trace(graph, name, "torch")
        image = verification_input(graph.input_size)
        with torch.no_grad():
            outputs = [output.numpy() for output in program.module()(image)]
        compare(outputs, reference_outputs(graph, image), fmt="torch", tolerance=FP32_TOLERANCE)
        torch.export.save(program, folder / "model.pt2")
        write_metadata(folder, metadata(model, name, "torch", "model.pt2", chosen))
    logger.info("wrote the torch export of %r to %s", name, target)
    return target
