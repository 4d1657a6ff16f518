"""``Prediction``, the ``Inferencer`` base class and ``load_inferencer``.

An export folder holds ``metadata.json`` and one model file. Its graph takes ``image``,
float32 (N, 3, H, W) RGB in [0, 1] with any N, H and W, resizes to the model's input size
itself, and returns ``pred_score`` (N,), ``pred_label`` (N,), ``anomaly_map`` (N, H, W) and
``pred_mask`` (N, H, W), normalized so that 0.5 is the threshold.

Batching: images of one size are stacked at their own size, so the graph does all the
resizing. A batch of mixed sizes is resized on the host to the model's input size (Pillow
bilinear, antialiased when shrinking: what the training data path does), run as one call,
and each anomaly map is resized back (bilinear) to its image's size. So the same image may
get marginally different maps alone and among images of other sizes; pass images of one
size, or ``batch_size=1``, where that matters. When the metadata names no input size, mixed
sizes run as one call per size instead.
"""

from __future__ import annotations

import abc
import inspect
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from anomaly_deploy.errors import ArtefactError, InputError, OptionError
from anomaly_deploy.inference._image import UInt8Image, resize_image, resize_map
from anomaly_deploy.inference._sources import Frame, load_one, open_source

__all__ = [
    "OUTPUT_NAMES",
    "Inferencer",
    "Prediction",
    "PredictionStream",
    "load_inferencer",
    "read_metadata",
]

logger = logging.getLogger(__name__)

OUTPUT_NAMES = ("pred_score", "pred_label", "anomaly_map", "pred_mask")
_SUPPORTED_SCHEMA = 1
_MODEL_FILES = {"onnx": "model.onnx", "openvino": "model.xml", "torch": "model.pt2"}
_THRESHOLD = 0.5


@dataclass(frozen=True, slots=True, eq=False)
class Prediction:
    """What an inferencer returns for one image; every field is at the image's own size.

    Attributes:
        pred_score: Normalized image score in [0, 1]; 0.5 is the threshold.
        pred_label: True when the image is anomalous (``pred_score >= 0.5``).
        anomaly_map: (H, W) float32 in [0, 1]; 0.5 is the pixel threshold.
        pred_mask: (H, W) bool, True on pixels predicted defective.
        image: (H, W, 3) uint8 RGB, the decoded input.
        source: Where the image came from: a file path, ``"array"``, ``"array:<i>"``,
            ``"bytes"`` or ``"frame:<i>"`` for video and camera frames.
    """

    pred_score: float
    pred_label: bool
    anomaly_map: npt.NDArray[np.float32]
    pred_mask: npt.NDArray[np.bool_]
    image: UInt8Image
    source: str

    def to_dict(self) -> dict[str, object]:
        """Return the JSON-safe summary: source, score and label (no arrays)."""
        return {
            "source": self.source,
            "pred_score": self.pred_score,
            "pred_label": self.pred_label,
        }

    def __repr__(self) -> str:
        height, width = self.anomaly_map.shape
        return (
            f"Prediction(source={self.source!r}, pred_score={self.pred_score:.4f}, "
            f"pred_label={self.pred_label!r}, size={height}x{width})"
        )


class PredictionStream(Iterator[Prediction]):
    """An iterator of predictions that also says how many there will be, when that is known.

    Attributes:
        total: The number of images of the source; None for cameras and open-ended streams.
        description: What the source is, e.g. ``"folder 'imgs' (12 images)"``.
    """

    def __init__(
        self, predictions: Iterator[Prediction], total: int | None, description: str
    ) -> None:
        self._predictions = predictions
        self.total = total
        self.description = description

    def __next__(self) -> Prediction:
        return next(self._predictions)

    def __iter__(self) -> PredictionStream:
        return self


def read_metadata(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """Find an export's folder and read its ``metadata.json``.

    Args:
        path: The export folder, or any file inside it (the model file, ``metadata.json``).

    Returns:
        The folder and the metadata.

    Raises:
        ArtefactError: When the folder or its metadata is missing or not valid.
    """
    given = Path(path)
    if not given.exists():
        msg = (
            f"export {str(given)!r} does not exist; pass the folder written by "
            "'anomaly export' (or the model file in it)"
        )
        raise ArtefactError(msg)
    folder = given if given.is_dir() else given.parent
    metadata_file = folder / "metadata.json"
    if not metadata_file.is_file():
        msg = (
            f"export folder {str(folder)!r} has no metadata.json; pass a folder written by "
            "'anomaly export', or export the model again"
        )
        raise ArtefactError(msg)
    try:
        metadata = json.loads(metadata_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        msg = f"{str(metadata_file)!r} cannot be read ({err}); export the model again"
        raise ArtefactError(msg) from err
    if not isinstance(metadata, dict) or not isinstance(metadata.get("format"), str):
        msg = (
            f"{str(metadata_file)!r} is not export metadata (no 'format' key); "
            "export the model again"
        )
        raise ArtefactError(msg)
    version = metadata.get("schema_version")
    if isinstance(version, int) and version > _SUPPORTED_SCHEMA:
        logger.warning(
            "%s has schema version %d, newer than the %d this anomaly-deploy reads; "
            "upgrade anomaly-deploy if loading fails",
            metadata_file,
            version,
            _SUPPORTED_SCHEMA,
        )
    return folder, metadata


def _input_size(metadata: Mapping[str, Any], folder: Path) -> tuple[int, int] | None:
    section = metadata.get("input", {})
    if not isinstance(section, Mapping):
        msg = f"metadata.json in {str(folder)!r} has a bad 'input' section; export again"
        raise ArtefactError(msg)
    height, width = section.get("height", 0), section.get("width", 0)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (height, width)):
        msg = (
            f"metadata.json in {str(folder)!r} has input size {height!r} x {width!r}; "
            "expected whole numbers, export the model again"
        )
        raise ArtefactError(msg)
    return (height, width) if height > 0 and width > 0 else None


class Inferencer(abc.ABC):
    """Run an exported model on images, folders, videos and cameras; no torch needed.

    Subclasses set ``format`` and implement ``_load`` and ``_run``; this class does the
    decoding, batching, resizing and packing into ``Prediction`` objects.

    Args:
        path: The export folder (or the model file inside it).
        device: Where the runtime runs the model (``"CPU"`` everywhere; see each subclass).

    Attributes:
        folder: The export folder.
        model_path: The model file.
        metadata: The parsed ``metadata.json``.
        input_size: ``(height, width)`` the model resizes images to; None when unknown.
        device: The device asked for.

    Raises:
        ArtefactError: When the export is missing, corrupt or of another format.
        OptionError: When the runtime cannot use ``device``.
    """

    format: ClassVar[str]

    def __init__(self, path: str | os.PathLike[str], device: str = "CPU") -> None:
        self.folder, self.metadata = read_metadata(path)
        found = self.metadata["format"]
        if found != self.format:
            msg = (
                f"{str(self.folder)!r} holds a {found!r} export, not {self.format!r}; "
                "load it with load_inferencer(path) or the matching inferencer"
            )
            raise ArtefactError(msg)
        given = Path(path)
        name = self.metadata.get("model_file") or _MODEL_FILES.get(self.format, "")
        if given.is_file() and given.name != "metadata.json":
            self.model_path = given
        else:
            self.model_path = self.folder / str(name)
        if not self.model_path.is_file():
            msg = (
                f"export folder {str(self.folder)!r} lacks its model file "
                f"{self.model_path.name!r}; export the model again"
            )
            raise ArtefactError(msg)
        if not isinstance(device, str) or not device.strip():
            msg = f"device must be a name such as 'CPU', got {device!r}"
            raise OptionError(msg)
        self.input_size = _input_size(self.metadata, self.folder)
        self.device = device
        self._load()
        logger.info("loaded %s export %s on %s", self.format, self.model_path, device)

    @abc.abstractmethod
    def _load(self) -> None:
        """Load ``self.model_path`` into the runtime; raise ArtefactError or OptionError."""

    @abc.abstractmethod
    def _run(self, batch: npt.NDArray[np.float32]) -> Mapping[str, np.ndarray]:
        """Run the graph on (N, 3, H, W) float32 in [0, 1]; return its outputs by name.

        At least ``pred_score`` and ``anomaly_map`` are needed; the labels and masks are
        derived from them when a graph lacks them.
        """

    # --- public API ---------------------------------------------------------------------

    def predict(self, image: object) -> Prediction:
        """Predict one image.

        Args:
            image: A file path, an (H, W, 3) uint8 RGB, (H, W) grayscale or (H, W, 4) RGBA
                array, or encoded image bytes.

        Raises:
            InputError: When the image cannot be read.
        """
        return self._predict_frames([load_one(image)])[0]

    def predict_batch(self, images: Sequence[object]) -> list[Prediction]:
        """Predict a batch of images (arrays or paths) in one runtime call.

        Raises:
            InputError: When an image cannot be read.
        """
        if isinstance(images, str | np.ndarray | bytes):
            msg = (
                f"predict_batch takes a sequence of images, got one {type(images).__name__}; "
                "use predict() for one image"
            )
            raise InputError(msg)
        frames = [
            load_one(item, f"array:{index}" if isinstance(item, np.ndarray) else None)
            for index, item in enumerate(images)
        ]
        return self._predict_frames(frames) if frames else []

    def predict_source(self, source: object, batch_size: int = 8) -> PredictionStream:
        """Predict every image of a source, lazily, ``batch_size`` images per runtime call.

        Args:
            source: An image file, a folder (recursive, sorted), a video file, a camera
                (``int`` or ``"camera:N"``), an array, or an iterable of paths and arrays.
            batch_size: Images per runtime call; 1 gives the lowest latency on a camera.

        Returns:
            An iterator of predictions in source order; its ``total`` is the number of
            images when known.

        Raises:
            InputError: At once when the source is missing, empty or cannot be opened; when
                reached for an unreadable image inside it.
            OptionError: When ``batch_size`` is not a positive integer.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            msg = f"batch_size must be a positive integer, got {batch_size!r}"
            raise OptionError(msg)
        opened = open_source(source)
        return PredictionStream(self._stream(opened, batch_size), opened.total, opened.description)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.folder)!r}, device={self.device!r})"

    # --- batching -----------------------------------------------------------------------

    def _stream(self, frames: Iterable[Frame], batch_size: int) -> Iterator[Prediction]:
        chunk: list[Frame] = []
        for frame in frames:
            chunk.append(frame)
            if len(chunk) == batch_size:
                yield from self._predict_frames(chunk)
                chunk = []
        if chunk:
            yield from self._predict_frames(chunk)

    def _predict_frames(self, frames: Sequence[Frame]) -> list[Prediction]:
        sizes = {frame.image.shape[:2] for frame in frames}
        if len(sizes) == 1:
            return self._run_same_size(frames, resize_to=None)
        if self.input_size is not None:
            return self._run_same_size(frames, resize_to=self.input_size)
        # No known input size to share: one call per size, results back in input order.
        results: dict[int, Prediction] = {}
        for size in sizes:
            indices = [i for i, frame in enumerate(frames) if frame.image.shape[:2] == size]
            chosen = self._run_same_size([frames[i] for i in indices], resize_to=None)
            results.update(zip(indices, chosen, strict=True))
        return [results[i] for i in range(len(frames))]

    def _run_same_size(
        self, frames: Sequence[Frame], resize_to: tuple[int, int] | None
    ) -> list[Prediction]:
        images = [
            frame.image if resize_to is None else resize_image(frame.image, resize_to)
            for frame in frames
        ]
        batch = np.stack(images).astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
        outputs = self._run(np.ascontiguousarray(batch))
        scores, labels, maps, masks = self._check_outputs(outputs, batch.shape)
        predictions = []
        for index, frame in enumerate(frames):
            height, width = frame.image.shape[:2]
            anomaly_map = np.asarray(maps[index], dtype=np.float32)
            mask = masks[index] if masks is not None else None
            if anomaly_map.shape != (height, width):
                anomaly_map = resize_map(anomaly_map, (height, width))
                mask = None  # a resized map needs its mask recomputed
            score = float(scores[index])
            predictions.append(
                Prediction(
                    pred_score=score,
                    pred_label=bool(labels[index]) if labels is not None else score >= _THRESHOLD,
                    anomaly_map=anomaly_map,
                    pred_mask=(
                        np.asarray(mask, dtype=bool) if mask is not None else anomaly_map >= 0.5
                    ),
                    image=frame.image,
                    source=frame.source,
                )
            )
        return predictions

    def _check_outputs(
        self, outputs: Mapping[str, np.ndarray], shape: tuple[int, ...]
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]:
        count, _, height, width = shape
        missing = [name for name in ("pred_score", "anomaly_map") if name not in outputs]
        if missing:
            msg = (
                f"the graph in {str(self.model_path)!r} has no output {missing[0]!r} "
                f"(it has {sorted(outputs)!r}); export the model again"
            )
            raise ArtefactError(msg)
        scores = np.asarray(outputs["pred_score"], dtype=np.float32).reshape(-1)
        maps = np.asarray(outputs["anomaly_map"], dtype=np.float32)
        if maps.ndim == 4 and maps.shape[1] == 1:
            maps = maps[:, 0]
        if scores.shape != (count,) or maps.ndim != 3 or maps.shape[0] != count:
            msg = (
                f"the graph in {str(self.model_path)!r} returned pred_score {scores.shape!r} "
                f"and anomaly_map {maps.shape!r} for {count} images; expected ({count},) and "
                f"({count}, {height}, {width}), export the model again"
            )
            raise ArtefactError(msg)
        labels = outputs.get("pred_label")
        masks = outputs.get("pred_mask")
        if labels is not None:
            labels = np.asarray(labels).reshape(-1)
            labels = labels if labels.shape == (count,) else None
        if masks is not None:
            masks = np.asarray(masks)
            masks = masks[:, 0] if masks.ndim == 4 and masks.shape[1] == 1 else masks
            masks = masks if masks.shape == maps.shape else None
        return scores, labels, maps, masks


def load_inferencer(
    path: str | os.PathLike[str], device: str = "CPU", **options: Any
) -> Inferencer:
    """Load an export with the inferencer of the format its ``metadata.json`` names.

    Args:
        path: The export folder (or the model file inside it).
        device: Where to run it: ``"CPU"`` (default), ``"GPU"``/``"CUDA"`` where the
            runtime has one, and any OpenVINO device name for OpenVINO exports.
        **options: Passed to the inferencer (e.g. ``num_threads`` for ONNX Runtime,
            ``performance_hint`` for OpenVINO).

    Raises:
        ArtefactError: When the export is missing, corrupt or of a format without an
            inferencer here (e.g. ``checkpoint``, which ``anomaly predict --ckpt`` reads).
        OptionError: When the runtime cannot use ``device`` or an option.
    """
    from anomaly_deploy.inference._onnx import OnnxInferencer
    from anomaly_deploy.inference._openvino import OpenVINOInferencer
    from anomaly_deploy.inference._torch import TorchInferencer

    classes: dict[str, type[Inferencer]] = {
        "onnx": OnnxInferencer,
        "openvino": OpenVINOInferencer,
        "torch": TorchInferencer,
    }
    folder, metadata = read_metadata(path)
    fmt = metadata["format"]
    if fmt not in classes:
        hint = (
            "predict with 'anomaly predict --ckpt' instead"
            if fmt == "checkpoint"
            else f"export with one of {sorted(classes)!r}"
        )
        msg = f"{str(folder)!r} holds a {fmt!r} export, which no inferencer here runs; {hint}"
        raise ArtefactError(msg)
    inferencer_class = classes[fmt]
    try:
        inspect.signature(inferencer_class).bind(path, device, **options)
    except TypeError as err:
        msg = (
            f"bad option for the {fmt!r} inferencer ({err}); see help({inferencer_class.__name__})"
        )
        raise OptionError(msg) from err
    return inferencer_class(path, device, **options)
