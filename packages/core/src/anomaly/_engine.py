"""``Engine``: fit, validate, test, train, predict and export on Lightning's ``Trainer``."""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from anomaly import __version__
from anomaly._batch import Batch, collate
from anomaly._datamodule import AnomalyDataModule
from anomaly._errors import ConfigError, DataError, ExportError, UnknownNameError
from anomaly._module import AnomalyModule
from anomaly._plugins import PluginManager, get_plugin_manager
from anomaly._specs import ComponentKind
from anomaly.io import image_to_tensor, is_image_file, read_image

__all__ = [
    "CHECKPOINT_FORMAT",
    "Engine",
    "EvaluationResult",
    "ExportResult",
    "FitResult",
    "ImagePrediction",
    "PredictionResult",
    "ProgressCallback",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
ProgressCallback = Callable[[str, int, int | None], None]
"""``progress(phase, done, total)``: called as batches finish; ``total`` None when unknown."""


@dataclass(frozen=True, slots=True)
class FitResult:
    """What ``Engine.fit`` did.

    Attributes:
        seconds: Wall time of fitting, validation (post-processing statistics) included.
        train_images: Number of training images seen.
        image_threshold: Raw image threshold learned on validation.
        pixel_threshold: Raw pixel threshold learned on validation.
    """

    seconds: float
    train_images: int
    image_threshold: float
    pixel_threshold: float


@dataclass(frozen=True, slots=True)
class ImagePrediction:
    """Normalized prediction for one image (a row of ``predictions.csv``)."""

    image_path: str
    pred_score: float
    pred_label: int
    gt_label: int | None


@dataclass(frozen=True, slots=True)
class EvaluationResult:
    """What ``Engine.test`` measured.

    Attributes:
        metrics: Metric name to value; NaN where a metric could not be computed.
        notes: Metric name to the reason it is NaN (``'no masks'``).
        images: Number of test images.
        seconds: Wall time of the test loop.
        predictions: One row per image.
        visualizations: Paths of the images the visualizer wrote.
    """

    metrics: Mapping[str, float]
    notes: Mapping[str, str]
    images: int
    seconds: float
    predictions: Sequence[ImagePrediction] = field(default_factory=tuple)
    visualizations: Sequence[Path] = field(default_factory=tuple)

    @property
    def images_per_second(self) -> float:
        """Test throughput."""
        return self.images / self.seconds if self.seconds > 0 else math.inf


@dataclass(frozen=True, slots=True)
class PredictionResult:
    """What ``Engine.predict`` returned: normalized batches and one row per image."""

    batches: Sequence[Batch]
    predictions: Sequence[ImagePrediction]
    visualizations: Sequence[Path] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class ExportResult:
    """Where ``Engine.export`` wrote a model, and in which format."""

    format: str
    path: Path


class _ProgressBridge(pl.Callback):
    """Forward Lightning's batch events to a plain progress callback."""

    def __init__(self, progress: ProgressCallback) -> None:
        self.progress = progress
        self.done = 0

    @staticmethod
    def _total(value: float | int | list[float | int] | None) -> int | None:
        if isinstance(value, list):
            value = sum(value)
        if value is None or value == math.inf:
            return None
        return int(value)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.done = 0
        epoch = f"fit (epoch {trainer.current_epoch + 1}/{trainer.max_epochs})"
        self.progress(
            epoch if (trainer.max_epochs or 1) > 1 else "fit",
            0,
            self._total(trainer.num_training_batches),
        )

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.done += 1
        epoch = f"fit (epoch {trainer.current_epoch + 1}/{trainer.max_epochs})"
        self.progress(
            epoch if (trainer.max_epochs or 1) > 1 else "fit",
            self.done,
            self._total(trainer.num_training_batches),
        )

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.done = 0

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.done += 1
        self.progress("validate", self.done, self._total(trainer.num_val_batches))

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.done = 0

    def on_test_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.done += 1
        self.progress("test", self.done, self._total(trainer.num_test_batches))

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.done = 0

    def on_predict_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.done += 1
        self.progress("predict", self.done, self._total(trainer.num_predict_batches))


class _Collector(pl.Callback):
    """Feed each normalized test or predict batch to metrics, a visualizer and the rows."""

    def __init__(self, metrics: Mapping[str, Any], visualizer: Any | None, keep: bool) -> None:
        self.metrics = metrics
        self.visualizer = visualizer
        self.keep = keep
        self.batches: list[Batch] = []
        self.rows: list[ImagePrediction] = []
        self.written: list[Path] = []
        self.images = 0

    def _consume(self, outputs: object) -> None:
        if not isinstance(outputs, Batch):
            msg = (
                f"a model's test and predict steps must return a Batch, got "
                f"{type(outputs).__name__}"
            )
            raise TypeError(msg)
        batch = outputs.detach_cpu()
        self.images += len(batch)
        for metric in self.metrics.values():
            metric.update(batch)
        if self.visualizer is not None:
            self.written.extend(self.visualizer.visualize(batch))
        assert batch.pred_score is not None
        assert batch.pred_label is not None
        for index in range(len(batch)):
            self.rows.append(
                ImagePrediction(
                    image_path=batch.image_path[index] if batch.image_path else "",
                    pred_score=float(batch.pred_score[index]),
                    pred_label=int(batch.pred_label[index]),
                    gt_label=None if batch.gt_label is None else int(batch.gt_label[index]),
                )
            )
        if self.keep:
            self.batches.append(batch)

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any
    ) -> None:
        self._consume(outputs)

    def on_predict_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any
    ) -> None:
        self._consume(outputs)


class _FileDataset(Dataset[dict[str, object]]):
    """Images from paths, resized like training data; no labels."""

    def __init__(self, paths: Sequence[Path], size: tuple[int, int]) -> None:
        self.paths = list(paths)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, object]:
        path = self.paths[index]
        return {
            "image": image_to_tensor(read_image(path), self.size),
            "gt_label": None,
            "gt_mask": None,
            "image_path": str(path),
        }


def image_paths(source: str | Path) -> list[Path]:
    """Return the image files of ``source`` (a file, or a folder searched recursively).

    Raises:
        DataError: When the source is missing or holds no images.
    """
    path = Path(source)
    if not path.exists():
        msg = f"prediction source {str(path)!r} does not exist; pass an image file or a folder"
        raise DataError(msg)
    if path.is_file():
        if not is_image_file(path):
            msg = (
                f"{str(path)!r} is not an image file (by its extension); pass an image or a folder"
            )
            raise DataError(msg)
        return [path]
    found = sorted(
        item
        for item in path.rglob("*")
        if is_image_file(item)
        and not any(part.startswith(".") for part in item.relative_to(path).parts)
    )
    if not found:
        msg = (
            f"folder {str(path)!r} holds no images; add .png/.jpg/... files or pick another folder"
        )
        raise DataError(msg)
    return found


# Lightning notices that do not apply to anomaly models: batches are moved by the module on
# purpose, and models fitted in one pass return no loss and need no optimizer.
_LIGHTNING_NOTICES = (
    r".*overridden `transfer_batch_to_device`.*",
    r".*`training_step` returned `None`.*",
    r".*configure_optimizers` returned `None`.*",
    r".*module\(s\) in eval mode.*",
    r".*does not have many workers.*",
    r".*GPU available but not used.*",
    r".*LitLogger.*",
    r".*LeafSpec.*",
)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    with warnings.catch_warnings():
        for pattern in _LIGHTNING_NOTICES:
            warnings.filterwarnings("ignore", message=pattern)
        yield


class Engine:
    """Assemble Lightning trainers for anomaly models and run every stage.

    Trainer arguments are cached and the ``Trainer`` is built only when a call knows both
    the model and the data, so either can change between calls. User arguments beat a
    model's ``trainer_arguments``.

    Args:
        plugin_manager: Where metrics, visualizers, exporters and model names are looked up;
            defaults to ``anomaly.get_plugin_manager()``.
        progress: Optional ``progress(phase, done, total)`` callback for long loops.
        **trainer_arguments: Passed to ``lightning.pytorch.Trainer`` (``accelerator``,
            ``devices``, ``max_epochs``, ``limit_train_batches``, ...).
    """

    def __init__(
        self,
        *,
        plugin_manager: PluginManager | None = None,
        progress: ProgressCallback | None = None,
        **trainer_arguments: Any,
    ) -> None:
        self.plugin_manager = plugin_manager or get_plugin_manager()
        self.progress = progress
        self.trainer_arguments = dict(trainer_arguments)
        self.trainer: pl.Trainer | None = None

    # --- trainer ------------------------------------------------------------------------

    def _build_trainer(
        self, model: AnomalyModule, callbacks: Iterable[pl.Callback] = ()
    ) -> pl.Trainer:
        arguments: dict[str, Any] = {
            "accelerator": "auto",
            "devices": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
        }
        arguments.update(type(model).trainer_arguments)
        arguments.update(self.trainer_arguments)
        all_callbacks = list(arguments.pop("callbacks", None) or [])
        all_callbacks.extend(callbacks)
        if self.progress is not None:
            all_callbacks.append(_ProgressBridge(self.progress))
        try:
            self.trainer = pl.Trainer(callbacks=all_callbacks, **arguments)
        except (TypeError, ValueError) as err:
            msg = f"invalid engine arguments {self.trainer_arguments!r}: {err}"
            raise ConfigError(msg) from err
        return self.trainer

    @staticmethod
    def _setup(datamodule: AnomalyDataModule) -> None:
        datamodule.setup()

    # --- stages -------------------------------------------------------------------------

    def fit(self, model: AnomalyModule, datamodule: AnomalyDataModule) -> FitResult:
        """Fit ``model`` on the training split, then learn post-processing on validation."""
        self._setup(datamodule)
        model.input_size = datamodule.image_size
        start = time.perf_counter()
        trainer = self._build_trainer(model)
        with _quiet_lightning():
            trainer.fit(model, datamodule=datamodule)
            if not bool(model.post_processor.fitted):
                trainer.validate(model, datamodule=datamodule, verbose=False)
        seconds = time.perf_counter() - start
        train_images = len(datamodule.train_data) if datamodule.train_data is not None else 0  # type: ignore[arg-type]
        return FitResult(
            seconds=seconds,
            train_images=train_images,
            image_threshold=float(model.post_processor.image_threshold),
            pixel_threshold=float(model.post_processor.pixel_threshold),
        )

    def validate(self, model: AnomalyModule, datamodule: AnomalyDataModule) -> FitResult:
        """Learn post-processing thresholds and statistics on the validation split again."""
        self._setup(datamodule)
        start = time.perf_counter()
        with _quiet_lightning():
            self._build_trainer(model).validate(model, datamodule=datamodule, verbose=False)
        return FitResult(
            seconds=time.perf_counter() - start,
            train_images=0,
            image_threshold=float(model.post_processor.image_threshold),
            pixel_threshold=float(model.post_processor.pixel_threshold),
        )

    def _require_fitted(self, model: AnomalyModule) -> None:
        if not bool(model.post_processor.fitted):
            msg = (
                f"model {type(model).__name__!r} has no learned threshold; fit it first "
                f"(Engine.fit or 'anomaly fit') or load a fitted checkpoint"
            )
            raise ConfigError(msg)

    def test(
        self,
        model: AnomalyModule,
        datamodule: AnomalyDataModule,
        *,
        metrics: Sequence[str] | None = None,
        visualizer: str | None = None,
        output_dir: str | Path | None = None,
    ) -> EvaluationResult:
        """Score the test split, compute ``metrics`` and optionally write visualizations.

        Args:
            model: A fitted model.
            datamodule: Data whose test split is scored.
            metrics: Metric registry names; defaults to every registered metric.
            visualizer: Visualizer registry name; None writes no images.
            output_dir: Where the visualizer writes (required with ``visualizer``).
        """
        self._require_fitted(model)
        self._setup(datamodule)
        built_metrics = self.build_metrics(metrics)
        built_visualizer = self.build_visualizer(visualizer, output_dir)
        collector = _Collector(built_metrics, built_visualizer, keep=False)
        start = time.perf_counter()
        with _quiet_lightning():
            self._build_trainer(model, [collector]).test(
                model, datamodule=datamodule, verbose=False
            )
        seconds = time.perf_counter() - start
        values: dict[str, float] = {}
        notes: dict[str, str] = {}
        for name, metric in built_metrics.items():
            values[name] = float(metric.compute())
            reason = getattr(metric, "reason", None)
            if math.isnan(values[name]):
                notes[name] = str(reason or "not computable on this data")
        return EvaluationResult(
            metrics=values,
            notes=notes,
            images=collector.images,
            seconds=seconds,
            predictions=tuple(collector.rows),
            visualizations=tuple(collector.written),
        )

    def train(
        self,
        model: AnomalyModule,
        datamodule: AnomalyDataModule,
        **test_options: Any,
    ) -> tuple[FitResult, EvaluationResult]:
        """Fit then test; ``test_options`` go to ``test``."""
        fitted = self.fit(model, datamodule)
        return fitted, self.test(model, datamodule, **test_options)

    def predict(
        self,
        model: AnomalyModule,
        data: AnomalyDataModule | str | Path | Sequence[str | Path],
        *,
        visualizer: str | None = None,
        output_dir: str | Path | None = None,
        batch_size: int = 8,
        keep_batches: bool = True,
    ) -> PredictionResult:
        """Predict on a datamodule's test split, an image file, a folder or a list of paths."""
        self._require_fitted(model)
        if isinstance(data, AnomalyDataModule):
            self._setup(data)
            loader: DataLoader[Any] = data.predict_dataloader()
        else:
            sources = [data] if isinstance(data, (str, Path)) else list(data)
            paths = [path for source in sources for path in image_paths(source)]
            size = model.input_size
            if size is None:
                msg = "the model does not know its input size; fit it or load a checkpoint first"
                raise ConfigError(msg)
            for path in paths:
                read_image(path)  # fail on a corrupt file before any work
            loader = DataLoader(
                _FileDataset(paths, size), batch_size=batch_size, collate_fn=collate
            )
        collector = _Collector({}, self.build_visualizer(visualizer, output_dir), keep=keep_batches)
        with _quiet_lightning():
            self._build_trainer(model, [collector]).predict(
                model, dataloaders=loader, return_predictions=False
            )
        return PredictionResult(
            batches=tuple(collector.batches),
            predictions=tuple(collector.rows),
            visualizations=tuple(collector.written),
        )

    def export(
        self,
        model: AnomalyModule,
        directory: str | Path,
        *,
        format: str = "checkpoint",
        datamodule: AnomalyDataModule | None = None,
        **options: Any,
    ) -> ExportResult:
        """Export a fitted model with its pre- and post-processing into ``directory``.

        Args:
            model: A fitted model.
            directory: The export folder (see the exporter for what it writes).
            format: Exporter registry name: ``checkpoint`` (core), ``torch``, ``onnx`` or
                ``openvino`` (anomaly-deploy), or a third-party one.
            datamodule: Data for exporters that calibrate (OpenVINO INT8): when the exporter
                takes ``calibration`` and none is given, it gets this datamodule's training
                loader.
            **options: Passed to the exporter (``precision="int8"``, ...).

        Raises:
            ConfigError: When the model is not fitted, or on options the exporter rejects.
            ExportError: When the exporter fails.
        """
        self._require_fitted(model)
        spec = self.plugin_manager.exporter(format)
        exporter = spec.load()
        if not callable(exporter):
            msg = (
                f"exporter {format!r} from {spec.provider!r} is not callable; "
                f"report it to its authors"
            )
            raise ExportError(msg)
        if (
            datamodule is not None
            and "calibration" not in options
            and _takes_parameter(exporter, "calibration")
        ):
            self._setup(datamodule)
            options["calibration"] = datamodule.train_dataloader()
        path = exporter(model, Path(directory), plugin_manager=self.plugin_manager, **options)
        return ExportResult(format=format, path=Path(path))

    # --- components ---------------------------------------------------------------------

    def build_metrics(self, names: Sequence[str] | None) -> dict[str, Any]:
        """Build metrics by registry name (all registered ones when ``names`` is None)."""
        chosen = self.plugin_manager.names(ComponentKind.METRIC) if names is None else list(names)
        built = {}
        for name in chosen:
            metric_class = self.plugin_manager.metric(name).load()
            built[name] = metric_class()  # type: ignore[operator]
        return built

    def build_visualizer(self, name: str | None, output_dir: str | Path | None) -> Any | None:
        """Build a visualizer by registry name writing into ``output_dir``; None for none."""
        if name is None:
            return None
        if output_dir is None:
            msg = f"visualizer {name!r} needs an output folder"
            raise ConfigError(msg)
        visualizer_class = self.plugin_manager.visualizer(name).load()
        return visualizer_class(output_dir)  # type: ignore[operator]

    # --- checkpoints --------------------------------------------------------------------

    def model_name(self, model: AnomalyModule) -> str:
        """Return the registry name of ``model``'s class.

        Raises:
            UnknownNameError: When no registered model spec targets that class.
        """
        registry = self.plugin_manager.specs(ComponentKind.MODEL)
        for name, spec in registry.items():
            module_name, _, attribute = spec.target.partition(":")
            cls = type(model)
            if attribute == cls.__qualname__ and (
                cls.__module__ == module_name or cls.__module__.startswith(module_name + ".")
            ):
                return name
        for name, spec in registry.items():
            if spec.load() is type(model):
                return name
        msg = (
            f"model class {type(model).__qualname__!r} is not registered by any plugin; register "
            f"it with anomaly_register_models to save or export it"
        )
        raise UnknownNameError(msg)

    def save_checkpoint(self, model: AnomalyModule, path: str | Path) -> Path:
        """Write a checkpoint loadable with ``torch.load(weights_only=True)``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "anomaly": {
                "format": CHECKPOINT_FORMAT,
                "model": self.model_name(model),
                "init_args": _plain(dict(model.hparams)),
                "input_size": list(model.input_size) if model.input_size else None,
                "core_version": __version__,
            },
            "state_dict": model.state_dict(),
        }
        torch.save(payload, path)
        return path

    def load_model(self, path: str | Path) -> AnomalyModule:
        """Build the model a checkpoint (or torch export folder) describes and load its weights.

        Loading never unpickles arbitrary objects (``weights_only=True``).

        Raises:
            ConfigError: When the file is missing or is not an anomaly checkpoint.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "model.pt"
        if not path.is_file():
            msg = (
                f"checkpoint {str(path)!r} does not exist; "
                f"pass a .ckpt file or a torch export folder"
            )
            raise ConfigError(msg)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            msg = (
                f"checkpoint {str(path)!r} cannot be loaded safely ({type(err).__name__}); "
                f"it may be corrupt or not an anomaly checkpoint"
            )
            raise ConfigError(msg) from err
        meta = payload.get("anomaly") if isinstance(payload, dict) else None
        if not isinstance(meta, dict) or "model" not in meta or "state_dict" not in payload:
            msg = (
                f"{str(path)!r} is not an anomaly checkpoint (no 'anomaly' metadata); "
                f"save it with anomaly fit"
            )
            raise ConfigError(msg)
        spec = self.plugin_manager.model(str(meta["model"]))
        model_class = spec.load()
        model = model_class(**dict(meta.get("init_args") or {}))  # type: ignore[operator]
        model.load_state_dict(payload["state_dict"])
        size = meta.get("input_size")
        model.input_size = tuple(size) if size else None
        model.eval()
        return model  # type: ignore[no-any-return]


def _takes_parameter(function: Callable[..., object], name: str) -> bool:
    """Return True when ``function`` has a parameter called ``name`` (not ``**kwargs``)."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # builtins and C callables without a signature
        return False
    parameter = parameters.get(name)
    return parameter is not None and parameter.kind is not inspect.Parameter.VAR_KEYWORD


def _plain(value: object) -> object:
    """Turn hyperparameters into plain data that ``weights_only`` loading accepts."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    msg = f"hyperparameter value {value!r} is not plain data; use str, int, float, bool or lists"
    raise ConfigError(msg)
