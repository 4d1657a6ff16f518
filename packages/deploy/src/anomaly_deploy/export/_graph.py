"""The inference graph every exporter writes, and tracing it with ``torch.export``.

The graph takes one ``image`` (N, 3, H, W) float32 RGB in [0, 1] of any batch size and any
image size, resizes it (bilinear, antialiased) to the model's input size, runs the model and
its post-processing with the statistics learned on validation data, and resizes the anomaly
map back to H x W. Runtimes therefore need no pre- or post-processing of their own.

The resize follows ``anomaly.io.image_to_tensor``, which training and ``Engine.predict`` use:
both are the same separable triangle filter widened by the scale factor (Pillow's BILINEAR
and torch's antialiased bilinear). Pillow rounds the resized pixels to 8 bits where the graph
keeps float32, so model inputs differ by at most half a grey level (0.002) plus float
rounding; the export tests bound that difference.

Runtimes do not all implement antialiased resizing: OpenVINO's CPU plugin reads ONNX's
``Resize(antialias=1)`` but resizes without the filter when shrinking, and its exact
``bilinear_pillow`` mode is slow. ``InferenceGraph(portable_resize=True)`` therefore spells the
same filter with gathers and matrix products, which every runtime runs exactly; the OpenVINO
exporter uses it, while torch and ONNX Runtime keep their fast native kernels.
"""

from __future__ import annotations

import contextlib
import linecache
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from anomaly import AnomalyError, AnomalyModule, ExportError
from anomaly.post_processing import normalize

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "InferenceGraph",
    "check_exportable",
    "example_input",
    "export_ready",
    "resize_bilinear_antialias",
    "trace",
]

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAMES = ("pred_score", "pred_label", "anomaly_map", "pred_mask")
_STATISTICS = (
    "image_threshold",
    "image_min",
    "image_max",
    "pixel_threshold",
    "pixel_min",
    "pixel_max",
)
# Which image dimension each traced symbol stands for, in the words of error messages.
_DIMENSIONS = {0: "batch size", 2: "image height", 3: "image width"}


class InferenceGraph(nn.Module):
    """Wrap a fitted model with its pre- and post-processing, as exporters write it.

    The post-processing statistics are copied into buffers of the graph, so later changes to
    the model's post-processor do not leak into an export built from this graph.

    Args:
        model: A fitted model whose ``input_size`` is known.
        portable_resize: Resize with ``resize_bilinear_antialias`` (plain gathers and matrix
            products) instead of torch's antialiased kernel, for runtimes that lack one.

    Raises:
        ExportError: When the model is not fitted or has no input size.
    """

    image_threshold: torch.Tensor
    image_min: torch.Tensor
    image_max: torch.Tensor
    pixel_threshold: torch.Tensor
    pixel_min: torch.Tensor
    pixel_max: torch.Tensor

    def __init__(self, model: AnomalyModule, *, portable_resize: bool = False) -> None:
        super().__init__()
        self.input_size = check_exportable(model)
        self.model = model
        self.portable_resize = portable_resize
        post = model.post_processor
        for name in _STATISTICS:
            value: torch.Tensor = getattr(post, name)
            self.register_buffer(name, value.detach().to(torch.float32).clone())

    def forward(
        self, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Score images of any size.

        Args:
            image: (N, 3, H, W) float32 RGB in [0, 1].

        Returns:
            ``pred_score`` (N,) float32 in [0, 1], ``pred_label`` (N,) bool (score >= 0.5),
            ``anomaly_map`` (N, H, W) float32 in [0, 1] and ``pred_mask`` (N, H, W) bool
            (map >= 0.5); 0.5 is the learned threshold after normalization.
        """
        height, width = image.shape[-2:]
        # Images usually shrink to the model's size, maps grow back: the portable resize
        # uses the form that is faster for each (both exact either way).
        raw_score, raw_map = self.model(self._resize(image, self.input_size, shrinking=True))
        score = normalize(raw_score, self.image_threshold, self.image_min, self.image_max)
        anomaly_map = normalize(raw_map, self.pixel_threshold, self.pixel_min, self.pixel_max)
        # Normalizing before resizing matches the model's own predictions at its input size.
        # Interpolation weights are non-negative and sum to one, so only float rounding can
        # step outside [0, 1]; the clamp keeps the contract exact.
        anomaly_map = self._resize(anomaly_map.unsqueeze(1), (height, width), shrinking=False)
        anomaly_map = anomaly_map.squeeze(1).clamp(0.0, 1.0)
        return score, score >= 0.5, anomaly_map, anomaly_map >= 0.5

    def _resize(
        self, image: torch.Tensor, size: tuple[int, int], *, shrinking: bool
    ) -> torch.Tensor:
        if self.portable_resize:
            return resize_bilinear_antialias(image, size, gather=shrinking)
        return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)


def _taps(in_length: int, out_length: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the weights and input indices of each output position along one axis.

    Pillow's and torch's antialiased bilinear filter: a triangle of half-width
    ``max(in / out, 1)`` input pixels centred on each output pixel, cut at the borders and
    renormalized. ``in_length`` may be a symbolic size while exporting.

    Returns:
        ``(weights, indices)``, both (out_length, taps): float weights summing to one per
        output position, and int64 indices into the input axis.
    """
    # Sizes enter as tensors, so exporters see plain tensor arithmetic, not symbolic floats.
    length = torch.ones(1, dtype=torch.float32, device=like.device) * in_length
    scale = length / out_length
    support = scale.clamp(min=1.0)
    # Enough taps for any output position: 2 * ceil(support) + 1, in integer arithmetic so
    # that the exporter keeps it symbolic; sym_max lets it prove that there are at least 3.
    taps = 2 * torch.sym_max((in_length + out_length - 1) // out_length, 1) + 1
    center = (torch.arange(out_length, dtype=torch.float32, device=like.device) + 0.5) * scale
    first = torch.floor(center - support + 0.5).clamp(min=0.0)
    offsets = torch.arange(taps, dtype=torch.float32, device=like.device)
    index = first.unsqueeze(1) + offsets.unsqueeze(0)  # (out, taps)
    distance = (index - center.unsqueeze(1) + 0.5) / support
    weight = torch.clamp(1.0 - torch.abs(distance), min=0.0)
    weight = weight * (index < length)  # taps past the border are dropped
    weight = weight / weight.sum(dim=1, keepdim=True)
    return weight.to(like.dtype), index.clamp(max=in_length - 1).to(torch.int64)


def _resize_rows(image: torch.Tensor, out_length: int) -> torch.Tensor:
    """Resize axis 2 of (N, C, L, M) to ``out_length``: gather whole rows, then one matmul."""
    weight, index = _taps(image.shape[2], out_length, image)
    rows = image[:, :, index, :]  # (N, C, out, taps, M): contiguous rows, a fast gather
    return (weight.unsqueeze(1) @ rows).squeeze(3)  # (out, 1, taps) @ (..., out, taps, M)


def _resize_matrix(in_length: int, out_length: int, like: torch.Tensor) -> torch.Tensor:
    """Return the dense (out_length, in_length) matrix of the filter along one axis."""
    length = torch.ones(1, dtype=torch.float32, device=like.device) * in_length
    scale = length / out_length
    support = scale.clamp(min=1.0)
    center = (torch.arange(out_length, dtype=torch.float32, device=like.device) + 0.5) * scale
    position = torch.arange(in_length, dtype=torch.float32, device=like.device) + 0.5
    distance = (position.unsqueeze(0) - center.unsqueeze(1)) / support
    weight = torch.clamp(1.0 - torch.abs(distance), min=0.0)
    return (weight / weight.sum(dim=1, keepdim=True)).to(like.dtype)


def resize_bilinear_antialias(
    image: torch.Tensor, size: tuple[int, int], *, gather: bool = True
) -> torch.Tensor:
    """Resize like ``F.interpolate(mode="bilinear", antialias=True)``, with portable operations.

    The result equals torch's (and Pillow's float) antialiased bilinear resize up to float
    rounding, for shrinking and enlarging alike; it exports to plain ``Gather`` and
    ``MatMul`` operations.

    Args:
        image: (N, C, H, W) float.
        size: ``(height, width)`` of the result.
        gather: Gather each output's few input rows and weight them (cost grows with the
            input only: fast for shrinking large images); False multiplies by dense filter
            matrices (cost grows with input times output: fast for enlarging and for small
            images). Both give the same numbers.

    Returns:
        (N, C, height, width).
    """
    height, width = size
    if not gather:
        rows = _resize_matrix(image.shape[2], height, image)  # (height, H)
        columns = _resize_matrix(image.shape[3], width, image)  # (width, W)
        return rows @ image @ columns.T
    resized = _resize_rows(image, height)
    return _resize_rows(resized.transpose(2, 3), width).transpose(2, 3)


def check_exportable(model: object) -> tuple[int, int]:
    """Return the ``(height, width)`` a model was fitted at, or raise if it cannot be exported.

    Raises:
        ExportError: When ``model`` is no ``AnomalyModule``, is not fitted or has no input size.
    """
    if not isinstance(model, AnomalyModule):
        msg = f"only anomaly models (AnomalyModule) can be exported, got {type(model).__name__!r}"
        raise ExportError(msg)
    if not bool(model.post_processor.fitted):
        msg = (
            f"model {type(model).__name__!r} is not fitted (no learned threshold); fit it "
            f"(Engine.fit or 'anomaly fit') or load a fitted checkpoint before exporting"
        )
        raise ExportError(msg)
    if model.input_size is None:
        msg = (
            f"model {type(model).__name__!r} does not know its input size; fit it with a "
            f"datamodule or load a checkpoint saved by anomaly before exporting"
        )
        raise ExportError(msg)
    height, width = (int(value) for value in model.input_size)
    return height, width


def example_input(size: tuple[int, int], batch: int = 2) -> torch.Tensor:
    """Return a seeded (batch, 3, h, w) image batch whose size differs from ``size``.

    Tracing with the model's own size would let the exporter specialize the resize away.
    """
    height, width = size
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, height + 3, width + 5, generator=generator)


@contextlib.contextmanager
def export_ready(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in the state exporters need, and restore it afterwards.

    Eval mode on the CPU; activations computed out of place (in-place ones double the time
    the ONNX exporter spends decomposing the graph, with the same numbers); backbones that
    run on another engine (``FeatureExtractor(runtime="openvino")`` and the like) traced as
    plain torch, which is what an exporter can read.
    """
    training = model.training
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    inplace = [module for module in model.modules() if getattr(module, "inplace", None) is True]
    runtimes = []
    for module in model.modules():
        runtime = getattr(module, "runtime", None)
        if isinstance(runtime, str) and runtime in {"compile", "openvino"}:
            runtimes.append((module, runtime))
    try:
        for module in inplace:
            module.inplace = False  # type: ignore[assignment]  # nn.ReLU and friends
        for module, runtime in runtimes:
            module.runtime = type(runtime)("eager")  # type: ignore[assignment]  # a str enum
        model.eval()
        if device.type != "cpu":
            model.to("cpu")
        yield
    finally:
        for module in inplace:
            module.inplace = True  # type: ignore[assignment]
        for module, runtime in runtimes:
            module.runtime = runtime  # type: ignore[assignment]  # restored as it was
        if device.type != "cpu":
            model.to(device)
        model.train(training)


# --- tracing --------------------------------------------------------------------------------


class _ShapeLog(logging.Handler):
    """Collect what the symbolic-shape engine says while ``torch.export`` traces."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.symbols: dict[str, int] = {}  # symbol -> dimension of the input image
        self.guards: list[tuple[str, str]] = []  # (expression, "path:line in function")

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        created = re.match(r"create_symbol (s\d+) = .*?\.size\(\)\[(\d+)\]", message)
        if created:
            self.symbols[created.group(1)] = int(created.group(2))
            return
        guard = re.match(r"eval (.+?) \[guard added\].*?\(([^()\s]+:\d+ in [\w<>]+)\)", message)
        if guard:
            self.guards.append((guard.group(1), guard.group(2)))

    def specialization(self) -> tuple[str, str, list[int]] | None:
        """Return the first guard in model code that pins an image dimension, if any.

        Returns:
            ``(expression, location, dimensions)``; equalities (``Eq(64*s0, 128)``) first.
        """
        found = []
        for expression, location in self.guards:
            dims = sorted(
                {self.symbols[s] for s in re.findall(r"s\d+", expression) if s in self.symbols}
            )
            if dims and _is_user_file(location.rpartition(":")[0]):
                found.append((not expression.startswith("Eq("), expression, location, dims))
        if not found:
            return None
        _, expression, location, dims = min(found, key=lambda item: item[0])
        return expression, location, dims


@contextlib.contextmanager
def _shape_log() -> Iterator[_ShapeLog]:
    """Capture the shape engine's INFO records without letting them reach the console.

    torch gives that logger its own stderr handler; it is set aside while the level is
    lowered, and everything is put back afterwards.
    """
    handler = _ShapeLog()
    shape_logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level, propagate, handlers = shape_logger.level, shape_logger.propagate, shape_logger.handlers
    shape_logger.handlers = [handler]
    shape_logger.setLevel(logging.INFO)
    shape_logger.propagate = False
    try:
        yield handler
    finally:
        shape_logger.handlers = handlers
        shape_logger.setLevel(level)
        shape_logger.propagate = propagate


def trace(graph: InferenceGraph, model_name: str, fmt: str) -> torch.export.ExportedProgram:
    """Trace ``graph`` with ``torch.export``: batch size, height and width stay dynamic.

    Raises:
        ExportError: Naming the operation or line that blocks the export.
    """
    dims = {
        0: torch.export.Dim("batch", min=1),
        2: torch.export.Dim("height", min=1),
        3: torch.export.Dim("width", min=1),
    }
    logger.info("tracing %r with torch.export", model_name)
    with _shape_log() as shapes, torch.no_grad():
        try:
            return torch.export.export(
                graph,
                (example_input(graph.input_size),),
                dynamic_shapes={INPUT_NAME: dims},
                strict=False,
            )
        except AnomalyError:
            raise
        # torch.export fails with many unrelated exception types (dynamo, fake tensors,
        # symbolic shapes, operator errors); every one of them means the same to the user.
        except Exception as err:
            msg = f"cannot export {model_name!r} to {fmt}: {describe_failure(err, shapes)}"
            raise ExportError(msg) from err


# --- naming what blocks an export -----------------------------------------------------------

_LIBRARIES = re.compile(r"(^|[\\/])(torch|functorch|onnxscript|onnx_ir|openvino)[\\/]")


def _is_user_file(path: str) -> bool:
    """Tell whether ``path`` is model code rather than torch or a converter.

    torch logs paths absolute, relative to the working directory, or relative to its own
    folder; only files that exist from here and lie outside those libraries count.
    """
    if _LIBRARIES.search(path):
        return False
    return any(Path(candidate).is_file() for candidate in (path, Path.cwd() / path))


_FRAME_PATTERNS = (
    re.compile(r'File "([^"]+)", line (\d+), in ([\w<>]+)'),
    re.compile(r"\(([^()\s]+\.py):(\d+) in ([\w<>]+)\)"),
)
_OPERATOR = re.compile(r"\b(aten[.:]{1,2}[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)")
# OpenVINO's frontends list what they could not convert.
_UNCONVERTED = re.compile(
    r"(?:No conversion rule found for operations|Conversion is failed for):\s*([^\n]+)"
)


def _source_line(path: str, line: int) -> str:
    for candidate in (path, str(Path.cwd() / path)):
        text = linecache.getline(candidate, line).strip()
        if text:
            return text
    return ""


def _where(location: str) -> str:
    """Turn ``path:line in func`` into ``func (file.py:line: `code`)``."""
    found = re.match(r"(.+):(\d+) in ([\w<>]+)$", location)
    if not found:
        return location
    path, line, function = found.group(1), int(found.group(2)), found.group(3)
    code = _source_line(path, line)
    shown = f"{Path(path).name}:{line}"
    return f"{function} ({shown}: `{code}`)" if code else f"{function} ({shown})"


def _user_frame(text: str) -> str | None:
    """Return the last frame of ``text`` outside torch and the converters, as ``path:line in f``."""
    frames = [
        f"{path}:{line} in {function}"
        for pattern in _FRAME_PATTERNS
        for path, line, function in pattern.findall(text)
        if _is_user_file(path)
    ]
    return frames[-1] if frames else None


def _first_line(err: BaseException, limit: int = 160) -> str:
    lines = [part.strip() for part in str(err).splitlines() if part.strip()]
    # OpenVINO puts where in its C++ sources it failed first; the reason follows.
    useful = [line for line in lines if not line.startswith(("Exception from", "Check '"))]
    line = (useful or lines or [""])[0]
    line = line or type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe_failure(err: BaseException, shapes: _ShapeLog | None = None) -> str:
    """Say in one line what blocked an export: an operator, a line of model code, or the error.

    Args:
        err: What the exporter or converter raised.
        shapes: What the symbolic-shape engine logged while tracing, when it was captured.
    """
    text = "\n".join(str(item) for item in _chain(err))
    if "specializ" in text or "Constraints violated" in text:
        pinned = shapes.specialization() if shapes is not None else None
        if pinned is not None:
            expression, location, dims = pinned
            names = " and ".join(_DIMENSIONS.get(dim, f"dimension {dim}") for dim in dims)
            return (
                f"{_where(location)} fixes the {names} to the traced value ({expression}); "
                f"the graph must take any size, so that code needs a path without "
                f"size-dependent Python while torch.compiler.is_exporting()"
            )
        return (
            f"the model's code fixes an input dimension to the traced value "
            f"({_first_line(err)}); it needs a path without size-dependent Python while "
            f"torch.compiler.is_exporting()"
        )
    unconverted = _UNCONVERTED.search(text)
    if unconverted:
        return (
            f"OpenVINO cannot convert {unconverted.group(1).strip()} "
            f"({_first_line(err)}); replace it in the model or pick another export format"
        )
    operator = _OPERATOR.search(text)
    if operator:
        return (
            f"operator {operator.group(1)!r} is not supported ({_first_line(err)}); "
            f"replace it in the model or pick another export format"
        )
    frame = _user_frame(text)
    if frame:
        return f"{_where(frame)} cannot be traced ({type(err).__name__}: {_first_line(err)})"
    return f"{type(err).__name__}: {_first_line(err)}"


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
