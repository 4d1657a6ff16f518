"""What every exporter shares: option checks, the output folder, metadata and self-checks."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomaly import AnomalyModule, ConfigError, Engine, ExportError, PluginManager, UnknownNameError

# The metadata schema is core's, shared with its checkpoint exporter.
# TODO: import it from a public core module once core re-exports ``export_metadata``.
from anomaly._export import export_metadata
from anomaly_deploy.export._graph import OUTPUT_NAMES, InferenceGraph, example_input

__all__ = [
    "PRECISIONS",
    "check_options",
    "check_output_folder",
    "check_precision",
    "compare",
    "metadata",
    "model_name",
    "reference_outputs",
    "staging",
    "verification_input",
]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
INPUTS_DESCRIPTION = "float32 N x 3 x H x W RGB in [0, 1], any N, H, W"


def check_options(fmt: str, options: Mapping[str, Any], accepted: Sequence[str]) -> None:
    """Raise for options an exporter does not take.

    Raises:
        ExportError: Naming the unknown options and the accepted ones.
    """
    if options:
        msg = (
            f"the {fmt} exporter does not take option(s) {sorted(options)!r}; "
            f"it accepts {list(accepted)!r}"
        )
        raise ExportError(msg)


def check_precision(fmt: str, precision: object, supported: Sequence[str]) -> str:
    """Return ``precision`` when ``fmt`` supports it.

    Raises:
        ConfigError: For an unknown precision or one this format does not offer.
    """
    if not isinstance(precision, str) or precision.lower() not in PRECISIONS:
        msg = f"unknown precision {precision!r}; use one of {list(PRECISIONS)!r}"
        raise ConfigError(msg)
    precision = precision.lower()
    if precision not in supported:
        others = "; use --format openvino for fp16 and int8" if fmt != "openvino" else ""
        msg = (
            f"the {fmt} exporter writes precision {list(supported)!r} only, "
            f"got {precision!r}{others}"
        )
        raise ConfigError(msg)
    return precision


def check_output_folder(directory: str | Path) -> Path:
    """Return ``directory`` as a path after checking that an export may be written there.

    Raises:
        ExportError: When it is a file or a folder that is not empty.
    """
    path = Path(directory)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        msg = f"export folder {str(path)!r} is not empty; pick a new folder or empty it"
        raise ExportError(msg)
    return path


@contextlib.contextmanager
def staging(directory: Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``directory``, renamed into place on success.

    On any error the temporary folder, and any parent folder made for it, is removed, so a
    failed export leaves nothing behind.
    """
    check_output_folder(directory)
    parent = directory.absolute().parent
    made = [folder for folder in (parent, *parent.parents) if not folder.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".partial", dir=parent))
    done = False
    try:
        yield temp
        if directory.exists():
            directory.rmdir()  # empty, checked above
        temp.rename(directory)
        done = True
    finally:
        if not done:
            shutil.rmtree(made[-1] if made else temp, ignore_errors=True)


def model_name(model: AnomalyModule, plugin_manager: PluginManager | None) -> str:
    """Return the registry name of ``model``'s class, or its lowercase class name."""
    try:
        return Engine(plugin_manager=plugin_manager).model_name(model)
    except UnknownNameError:
        # A deploy export needs no registry entry to be loaded again: the name is a label.
        return type(model).__name__.lower()


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def metadata(
    model: AnomalyModule,
    name: str,
    fmt: str,
    model_file: str,
    precision: str,
    tools: Iterable[str] = (),
) -> dict[str, Any]:
    """Return the ``metadata.json`` content of a deploy export (the deploy contract's keys).

    Args:
        model: The exported model.
        name: Its registry name.
        fmt: ``torch``, ``onnx`` or ``openvino``.
        model_file: The model file's name inside the export folder.
        precision: ``fp32``, ``fp16`` or ``int8``.
        tools: Distributions that wrote or checked the model file; their versions are recorded.
    """
    data = export_metadata(model, name, fmt, model_file)
    data["input"]["resize"] = "bilinear, antialiased, inside the graph"
    data["precision"] = precision
    data["inputs"] = {"image": INPUTS_DESCRIPTION}
    data["outputs"] = list(OUTPUT_NAMES)
    versions = dict(data.get("versions", {}))
    versions["anomaly_deploy"] = _version("anomaly-deploy")
    for tool in tools:
        versions[tool.replace("-", "_")] = _version(tool)
    data["versions"] = {key: value for key, value in versions.items() if value is not None}
    return data


def write_metadata(folder: Path, data: Mapping[str, Any]) -> None:
    """Write ``metadata.json``."""
    (folder / "metadata.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# --- self-checks ----------------------------------------------------------------------------


def verification_input(size: tuple[int, int]) -> torch.Tensor:
    """Return a batch that differs from the traced one in batch size, height and width."""
    height, width = size
    traced = example_input(size)
    generator = torch.Generator().manual_seed(1)
    shape = (3, 3, max(8, height // 2 + 1), width + width // 3 + 2)
    assert shape[-2:] != traced.shape[-2:]
    return torch.rand(*shape, generator=generator)


def reference_outputs(graph: InferenceGraph, image: torch.Tensor) -> list[np.ndarray]:
    """Run the torch graph on ``image``; the outputs every export is checked against."""
    with torch.no_grad():
        return [output.numpy() for output in graph(image)]


def compare(
    outputs: Sequence[np.ndarray],
    expected: Sequence[np.ndarray],
    *,
    fmt: str,
    tolerance: float | None,
) -> None:
    """Check an export's outputs against the torch graph's on the verification batch.

    Args:
        outputs: The export's four outputs.
        expected: The torch graph's four outputs.
        fmt: Format name for the message.
        tolerance: Largest allowed difference of scores and maps; None checks shapes,
            types and ranges only (quantized exports).

    Raises:
        ExportError: When a shape, type or value disagrees.
    """
    for name, got, want in zip(OUTPUT_NAMES, outputs, expected, strict=True):
        got = np.asarray(got)
        if got.shape != want.shape or (got.dtype == np.bool_) != (want.dtype == np.bool_):
            msg = (
                f"the {fmt} export returns {name} of shape {got.shape} ({got.dtype}) where the "
                f"model gives {want.shape} ({want.dtype}); report this as a bug"
            )
            raise ExportError(msg)
        if got.dtype == np.bool_:
            continue
        if not np.isfinite(got).all() or got.min() < 0.0 or got.max() > 1.0:
            msg = f"the {fmt} export returns {name} outside [0, 1]; report this as a bug"
            raise ExportError(msg)
        if tolerance is not None:
            worst = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
            if worst > tolerance:
                msg = (
                    f"the {fmt} export disagrees with the model: {name} differs by {worst:.3g} "
                    f"(allowed {tolerance:.3g}) on a batch of shape {want.shape}; report this "
                    f"as a bug"
                )
                raise ExportError(msg)
