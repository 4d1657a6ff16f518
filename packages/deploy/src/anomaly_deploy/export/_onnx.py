"""Export to ONNX with the dynamo-based ``torch.onnx`` exporter, checked in ONNX Runtime."""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

from anomaly import AnomalyError, AnomalyModule, ExportError, PluginManager
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
from anomaly_deploy.export._graph import (
    INPUT_NAME,
    OUTPUT_NAMES,
    InferenceGraph,
    describe_failure,
    export_ready,
    trace,
)

__all__ = ["OPSET", "export_onnx", "write_onnx"]

logger = logging.getLogger(__name__)

# Opset 18 is the first with antialiased Resize; ONNX Runtime >= 1.14 and OpenVINO read it.
OPSET = 18
# Float32 kernels of two runtimes differ by rounding only; normalized values are in [0, 1].
FP32_TOLERANCE = 1e-3


def write_onnx(graph: InferenceGraph, path: Path, name: str, *, final: bool = True) -> None:
    """Trace ``graph`` and write it as an ONNX model to ``path``.

    Args:
        graph: The graph to export.
        path: Where the ``.onnx`` file goes.
        name: The model's name, for messages.
        final: The file is the export itself: check it with ``onnx.checker``. A file only
            read by another converter skips the check.

    Raises:
        ExportError: When tracing, conversion or the check fails, naming what blocks it.
    """
    import onnx
    import torch

    program = trace(graph, name, "onnx")
    logger.info("converting %r to ONNX (opset %d)", name, OPSET)
    with tempfile.TemporaryDirectory(prefix="anomaly-onnx-") as artifacts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # notes about the exporter's own internals
                onnx_program = torch.onnx.export(
                    program,
                    dynamo=True,
                    input_names=[INPUT_NAME],
                    output_names=list(OUTPUT_NAMES),
                    opset_version=OPSET,
                    # Constant folding also gives later converters (OpenVINO, NNCF) static
                    # weights.
                    optimize=True,
                    verbose=False,
                    # Reports go there, never into the working directory.
                    artifacts_dir=artifacts,
                )
        except AnomalyError:
            raise
        # The ONNX exporter raises its own, torch's and onnxscript's error types.
        except Exception as err:
            msg = f"cannot export {name!r} to onnx: {describe_failure(err)}"
            raise ExportError(msg) from err
    if onnx_program is None:  # only the TorchScript exporter returns None
        msg = f"cannot export {name!r} to onnx: the exporter returned no program"
        raise ExportError(msg)
    # Weights go into the file itself unless the model passes protobuf's 2 GB limit.
    onnx_program.save(str(path))
    if not final:
        return
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        msg = f"the onnx export of {name!r} is invalid ({describe_failure(err)}); report it"
        raise ExportError(msg) from err


def _run_onnxruntime(path: Path, image: Any) -> list[Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    # Idle worker threads would otherwise spin for a while and slow the torch work that follows.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outputs: list[Any] = session.run(list(OUTPUT_NAMES), {INPUT_NAME: image.numpy()})
    return outputs


def export_onnx(
    model: AnomalyModule,
    directory: str | Path,
    *,
    plugin_manager: PluginManager | None = None,
    precision: Literal["fp32"] = "fp32",
    **options: Any,
) -> Path:
    """Write ``model.onnx`` (opset 18) and ``metadata.json`` into ``directory``.

    The graph takes ``image`` (N, 3, H, W) float32 RGB in [0, 1] with any N, H and W and
    returns ``pred_score`` (N,), ``pred_label`` (N,), ``anomaly_map`` (N, H, W) and
    ``pred_mask`` (N, H, W), with resizing, the model and post-processing inside. Before the
    folder is written the model is checked with ``onnx.checker`` and run once in ONNX Runtime
    against the torch model on a batch of another size.

    Args:
        model: A fitted model.
        directory: Export folder; created, and must be empty if it exists.
        plugin_manager: Where the model's registry name is looked up.
        precision: ``"fp32"`` only (OpenVINO offers fp16 and int8).
        **options: None are accepted; any raises ``ExportError``.

    Returns:
        ``directory``.

    Raises:
        ExportError: On an unknown option, a model that is not fitted, an operation the
            exporter cannot convert (named in the message) or a failed check.
        ConfigError: On an unsupported precision.
    """
    check_options("onnx", options, ["precision"])
    chosen = check_precision("onnx", precision, ["fp32"])
    target = check_output_folder(directory)
    name = model_name(model, plugin_manager)
    with export_ready(model), staging(target) as folder:
        graph = InferenceGraph(model)
        write_onnx(graph, folder / "model.onnx", name)
        image = verification_input(graph.input_size)
        compare(
            _run_onnxruntime(folder / "model.onnx", image),
            reference_outputs(graph, image),
            fmt="onnx",
            tolerance=FP32_TOLERANCE,
        )
        data = metadata(
            model, name, "onnx", "model.onnx", chosen, ["onnx", "onnxscript", "onnxruntime"]
        )
        write_metadata(folder, data)
    logger.info("wrote the onnx export of %r to %s", name, target)
    return target
