"""Export to OpenVINO IR in FP32, FP16 or INT8 (NNCF post-training quantization)."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from anomaly import AnomalyModule, ConfigError, ExportError, PluginManager
from anomaly_deploy.export._calibration import (
    CalibrationSource,
    calibration_images,
    with_synthetic_defects,
)
from anomaly_deploy.export._common import (
    PRECISIONS,
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
    InferenceGraph,
    check_exportable,
    describe_failure,
    export_ready,
)
from anomaly_deploy.export._onnx import write_onnx

__all__ = ["export_openvino"]

logger = logging.getLogger(__name__)

# Largest difference of normalized scores and maps from the torch model, checked at export
# time with OpenVINO computing in float32; INT8 is checked for shapes and ranges only.
_TOLERANCE = {"fp32": 1e-3, "fp16": 0.05}


def export_openvino(
    model: AnomalyModule,
    directory: str | Path,
    *,
    plugin_manager: PluginManager | None = None,
    precision: Literal["fp32", "fp16", "int8"] = "fp32",
    calibration: CalibrationSource | None = None,
    calibration_size: int = 300,
    quantize_share: float = 0.6,
    **options: Any,
) -> Path:
    """Write ``model.xml``, ``model.bin`` and ``metadata.json`` into ``directory``.

    The graph is the ONNX export's (same input, outputs and post-processing), read by
    OpenVINO; its antialiased resizing is spelled with gathers and matrix products, which
    OpenVINO runs exactly (its own antialiased resize is not).

    - ``fp16`` stores the weights in half precision: half the file size; devices compute at
      their own precision.
    - ``int8`` quantizes with NNCF's post-training quantization on ``calibration`` images,
      each also used with synthetic defects painted in so that activation ranges cover what
      defects produce. The backbone's early convolutions are quantized (``quantize_share``);
      its first and deeper convolutions, distances to memory banks and Gaussian statistics,
      and the map smoothing stay in floating point, where 8 bits would change scores most.

    Before the folder is written, the IR is run once in OpenVINO against the torch model on
    a batch of another size.

    Args:
        model: A fitted model.
        directory: Export folder; created, and must be empty if it exists.
        plugin_manager: Where the model's registry name is looked up.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        calibration: For ``int8``: normal images like the training set, as a folder path or an
            iterable of image batches (e.g. a datamodule's ``train_dataloader()``); ignored
            otherwise.
        calibration_size: Most calibration images used.
        quantize_share: For ``int8``: share of the backbone's convolutions quantized, from
            the image side; the deeper ones stay in floating point because anomaly scores
            amplify their quantization errors. 1.0 quantizes all of them (fastest, least
            faithful).
        **options: None other are accepted; any raises ``ExportError``.

    Returns:
        ``directory``.

    Raises:
        ConfigError: On an unknown precision, a bad ``calibration_size``, or ``int8`` without
            calibration data.
        DataError: When the calibration folder is missing, empty or unreadable.
        ExportError: On an unknown option, a model that is not fitted, an operation that
            cannot be converted (named in the message) or a failed check.
    """
    check_options(
        "openvino", options, ["precision", "calibration", "calibration_size", "quantize_share"]
    )
    chosen = check_precision("openvino", precision, PRECISIONS)
    if (
        not isinstance(calibration_size, int)
        or isinstance(calibration_size, bool)
        or calibration_size < 1
    ):
        msg = f"calibration_size must be a positive number of images, got {calibration_size!r}"
        raise ConfigError(msg)
    if (
        not isinstance(quantize_share, int | float)
        or isinstance(quantize_share, bool)
        or not 0.0 < quantize_share <= 1.0
    ):
        msg = f"quantize_share must lie in (0, 1], got {quantize_share!r}; e.g. 0.6"
        raise ConfigError(msg)
    target = check_output_folder(directory)
    size = check_exportable(model)
    name = model_name(model, plugin_manager)
    samples = None
    if chosen == "int8":
        if calibration is None:
            msg = (
                "int8 export needs calibration images: pass calibration=<folder of normal "
                "images or a DataLoader> (CLI: --calibration FOLDER; Engine.export(..., "
                "datamodule=dm) uses its training images)"
            )
            raise ConfigError(msg)
        samples = calibration_images(calibration, size, calibration_size)
    elif calibration is not None:
        logger.debug("calibration data is used for int8 only; ignored for %s", chosen)
    with (
        export_ready(model),
        staging(target) as folder,
        tempfile.TemporaryDirectory(prefix="anomaly-openvino-") as work,
    ):
        # OpenVINO's CPU plugin ignores antialiasing when it shrinks: see the _graph module.
        graph = InferenceGraph(model, portable_resize=True)
        onnx_path = Path(work) / "model.onnx"
        write_onnx(graph, onnx_path, name, final=False)
        ov_model = _read(onnx_path, name)
        if samples is not None:
            ov_model = _quantize(ov_model, samples, name, quantize_share)
        import openvino as ov

        ov.save_model(ov_model, str(folder / "model.xml"), compress_to_fp16=chosen == "fp16")
        image = verification_input(graph.input_size)
        compare(
            _run_openvino(folder / "model.xml", image.numpy()),
            reference_outputs(graph, image),
            fmt=f"openvino {chosen}",
            tolerance=_TOLERANCE.get(chosen),
        )
        tools = ["openvino", "onnx", "onnxscript", *(["nncf"] if chosen == "int8" else [])]
        write_metadata(folder, metadata(model, name, "openvino", "model.xml", chosen, tools))
    logger.info("wrote the openvino %s export of %r to %s", chosen, name, target)
    return target


def _read(onnx_path: Path, name: str) -> Any:
    """Read the ONNX model into OpenVINO (the runtime's own reader: no conversion tool)."""
    import openvino as ov

    logger.info("converting %r to OpenVINO", name)
    try:
        return ov.Core().read_model(str(onnx_path))
    except RuntimeError as err:
        msg = f"cannot export {name!r} to openvino: {describe_failure(err)}"
        raise ExportError(msg) from err


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """Keep NNCF's INFO lines and progress bars (printed to stdout) off the console."""
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        nncf_logger.setLevel(level)


def _quantizable_scope(ov_model: Any, share: float) -> Any:
    """Return NNCF's ignored scope: everything but the backbone's early convolutions.

    Quantized: the convolutions of the first ``share`` of the image path (in graph order),
    except the very first. Kept in floating point:

    - the first convolution, which reads the image: images already have 8 bits per channel,
      but a 256-level grid over the normalized range falls between their levels and adds up
      to half a grey level of noise, which alone moves anomaly features by several percent;
    - the deeper convolutions: memory-bank distances and Mahalanobis distances amplify
      errors in the features they produce (on 64 px synthetic data, quantizing every
      convolution flipped 4 % of PaDiM's labels; keeping the last 40 % in float, none but
      one in 70);
    - convolutions with one channel in and out (map smoothing, which convolves scores);
    - every operation that is no convolution: matrix products compare features with memory
      banks and Gaussian statistics, where 8 bits erase the small differences between
      distances that decide a score.
    """
    import nncf

    convolutions = {"Convolution", "GroupConvolution"}
    ops = list(ov_model.get_ordered_ops())
    image_path: list[str] = []
    single: list[str] = []
    for op in ops:
        if op.get_type_name() not in convolutions:
            continue
        weights = op.input_value(1).get_partial_shape()
        one = weights.is_static and weights[0].get_length() == 1 and weights[1].get_length() == 1
        (single if one else image_path).append(op.get_friendly_name())
    quantized = set(image_path[1 : math.ceil(share * len(image_path))])
    ignored_names = [name for name in image_path if name not in quantized] + single
    ignored_types = sorted({op.get_type_name() for op in ops} - convolutions)
    return nncf.IgnoredScope(names=ignored_names, types=ignored_types, validate=False)


def _quantize(ov_model: Any, samples: Sequence[np.ndarray], name: str, share: float) -> Any:
    import nncf

    samples = with_synthetic_defects(list(samples))
    logger.info("quantizing %r to int8 on %d calibration images", name, len(samples))

    def to_input(sample: np.ndarray) -> np.ndarray:
        return sample.astype(np.float32)

    try:
        with _quiet_nncf():
            return nncf.quantize(
                ov_model,
                nncf.Dataset(list(samples), to_input),
                subset_size=len(samples),
                ignored_scope=_quantizable_scope(ov_model, share),
            )
    # NNCF fails in many ways on graphs it does not expect (its own errors, IndexError, ...).
    except Exception as err:
        msg = f"cannot quantize {name!r} to int8: {describe_failure(err)}"
        raise ExportError(msg) from err


def _run_openvino(path: Path, image: np.ndarray) -> list[np.ndarray]:
    import openvino as ov

    core = ov.Core()
    # Float32 arithmetic: CPUs with bf16 units would otherwise round to bf16 by default.
    compiled = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    results = compiled([image])
    return [np.asarray(results[port]) for port in compiled.outputs]
