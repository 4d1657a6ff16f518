"""``anomaly fit|test|train|predict|export``: one pipeline stage each."""

from __future__ import annotations

import json
from pathlib import Path

import click

from anomaly._cli._common import (
    CONFIG_HELP,
    CONTEXT_SETTINGS,
    ResultsFolder,
    build_component,
    config_options,
    data_label,
    load_run_config,
    make_engine,
    metrics_json,
    metrics_table,
    prepare,
    progress_bar,
    set_seed,
    splits_table,
    verbosity,
    write_json,
    write_predictions,
    write_yaml,
)
from anomaly._cli._console import console, err_console, quiet_lightning
from anomaly._plugins import get_plugin_manager

CKPT_HELP = "Checkpoint file (weights/model.ckpt of a run) or checkpoint export folder."


def _quiet(ctx: click.Context) -> bool:
    obj = ctx.find_root().obj
    return bool(obj.get("quiet")) if obj else False


def _fit_and_maybe_test(
    ctx: click.Context, configs: tuple[str, ...], as_json: bool, *, test: bool
) -> None:
    config = load_run_config(configs, ctx.args)
    pm = get_plugin_manager()
    model, datamodule = prepare(config, pm)
    assert model is not None
    assert datamodule is not None
    if not as_json:
        err_console.print(splits_table(datamodule.summaries))
    results = ResultsFolder(config.results_dir, config.model.name, *data_label(config))
    with results as folder:
        write_yaml(folder / "config.yaml", config.to_dict())
        with progress_bar(not _quiet(ctx) and not as_json) as progress:
            engine = make_engine(config, pm, progress)
            fitted = engine.fit(model, datamodule)
            checkpoint = engine.save_checkpoint(model, folder / "weights" / "model.ckpt")
            result = None
            if test:
                result = engine.test(
                    model,
                    datamodule,
                    metrics=config.metrics,
                    visualizer=config.visualizer,
                    output_dir=folder / "images",
                )
        report: dict[str, object] = {
            "model": config.model.name,
            "data": config.data.name,
            "fit_seconds": round(fitted.seconds, 3),
            "train_images": fitted.train_images,
            "thresholds": {"image": fitted.image_threshold, "pixel": fitted.pixel_threshold},
            "checkpoint": str(results.relocate(checkpoint)),
        }
        if result is not None:
            report.update(metrics_json(result))
            write_json(folder / "metrics.json", report)
            write_predictions(folder / "predictions.csv", result.predictions)
        else:
            write_json(folder / "fit.json", report)
    if as_json:
        report["results_dir"] = str(results.final)
        console.print_json(json.dumps(report))
        return
    if result is not None:
        console.print(metrics_table(result))
    console.print(f"fit {fitted.seconds:.1f} s on {fitted.train_images} images")
    console.print(f"Checkpoint: [bold]{report['checkpoint']}[/bold]")
    console.print(f"Results: [bold]{results.final}[/bold]")


@click.command(context_settings=CONTEXT_SETTINGS, epilog=CONFIG_HELP)
@config_options
@click.pass_context
def fit(ctx: click.Context, configs: tuple[str, ...], as_json: bool) -> None:
    """Fit a model and learn its thresholds.

    Fits on the training split, learns thresholds and normalization on the validation
    split and writes the checkpoint and resolved config into a new results folder.

    \b
    Examples:
      anomaly fit --model patchcore --data folder --data.root ./screws --data.abnormal_dirs [bad]
    """
    _fit_and_maybe_test(ctx, configs, as_json, test=False)


@click.command(context_settings=CONTEXT_SETTINGS, epilog=CONFIG_HELP)
@config_options
@click.pass_context
def train(ctx: click.Context, configs: tuple[str, ...], as_json: bool) -> None:
    """Fit a model, then test it.

    Like 'anomaly run' without the export: writes the checkpoint, metrics, predictions and
    heat-map images into a new results folder.

    \b
    Examples:
      anomaly train --model padim --data demo --data.category grass
    """
    _fit_and_maybe_test(ctx, configs, as_json, test=True)


@click.command(context_settings=CONTEXT_SETTINGS, epilog=CONFIG_HELP)
@click.option("--ckpt", required=True, type=click.Path(), help=CKPT_HELP)
@config_options
@click.pass_context
def test(ctx: click.Context, ckpt: str, configs: tuple[str, ...], as_json: bool) -> None:
    """Test a fitted model on a dataset's test split.

    The model comes from the checkpoint; the data, metrics and visualizer from the config
    and options. Writes metrics, predictions and heat-map images into a new results folder.

    \b
    Examples:
      anomaly test --ckpt results/patchcore/demo/brick/20260101-120000/weights/model.ckpt
    """
    config = load_run_config(configs, ctx.args)
    pm = get_plugin_manager()
    set_seed(config.seed)
    engine = make_engine(config, pm, None)
    model = engine.load_model(ckpt)
    for name in config.metrics:
        pm.metric(name)
    datamodule = build_component(pm, "data", config.data.name, config.data.init_args)
    datamodule.setup()
    model_name = engine.model_name(model)
    results = ResultsFolder(config.results_dir, model_name, *data_label(config))
    with results as folder:
        write_yaml(folder / "config.yaml", config.to_dict())
        with progress_bar(not _quiet(ctx) and not as_json) as progress:
            engine.progress = progress
            result = engine.test(
                model,
                datamodule,
                metrics=config.metrics,
                visualizer=config.visualizer,
                output_dir=folder / "images",
            )
        report = {
            "model": model_name,
            "data": config.data.name,
            "checkpoint": str(ckpt),
            **metrics_json(result),
        }
        write_json(folder / "metrics.json", report)
        write_predictions(folder / "predictions.csv", result.predictions)
    if as_json:
        report["results_dir"] = str(results.final)
        console.print_json(json.dumps(report))
        return
    console.print(metrics_table(result))
    console.print(f"Results: [bold]{results.final}[/bold]")


@click.command(
    context_settings={
        **CONTEXT_SETTINGS,
        "ignore_unknown_options": False,
        "allow_extra_args": False,
    }
)
@click.option(
    "--ckpt",
    default=None,
    type=click.Path(),
    help=(
        "Checkpoint file (weights/model.ckpt of a run) or checkpoint export folder; "
        "give --ckpt or --model."
    ),
)
@click.option(
    "--model",
    "model_path",
    default=None,
    type=click.Path(),
    help=(
        "Export folder of any format (metadata.json and model file, from 'anomaly export') "
        "to predict with its runtime; no checkpoint or training code needed."
    ),
)
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False),
    default="results/predictions",
    show_default=True,
    help="Folder for predictions and images (a new subfolder per call).",
)
@click.option(
    "--visualizer",
    default="image",
    show_default=True,
    help="Visualizer name, or 'none' for no images.",
)
@click.option(
    "--batch-size",
    default=8,
    show_default=True,
    type=click.IntRange(1, 1024),
    help="Images per batch.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help=(
        "Where to run: auto (CPU for --model), cpu, cuda/gpu; with --model also any "
        "device of the export's runtime (e.g. OpenVINO's GPU or NPU)."
    ),
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    default=False,
    show_default=True,
    help="Print the predictions as JSON on stdout.",
)
@click.argument("source", type=click.Path())
@click.pass_context
def predict(
    ctx: click.Context,
    ckpt: str | None,
    model_path: str | None,
    output: str,
    visualizer: str,
    batch_size: int,
    device: str,
    as_json: bool,
    source: str,
) -> None:
    """Predict scores, labels and heat maps for images.

    SOURCE is an image file or a folder (searched recursively); with --model also a video
    file or a camera (camera:0). Writes predictions.csv, predictions.json and one
    visualization per image into a new folder under --output.

    \b
    Examples:
      anomaly predict --ckpt results/.../weights/model.ckpt ./new_images
      anomaly predict --model results/.../export/openvino ./new_images
      anomaly predict --model deploy/onnx line.mp4 --batch-size 1
    """
    import csv
    from typing import Any

    from anomaly._errors import AnomalyError, ConfigError, DataError, UnknownNameError

    if (ckpt is None) == (model_path is None):
        msg = "pass exactly one of --ckpt (a checkpoint) or --model (an export folder)"
        raise click.UsageError(msg)
    pm = get_plugin_manager()
    chosen = None if visualizer.lower() == "none" else visualizer
    if chosen is not None:
        pm.visualizer(chosen)
    wanted = device.strip().lower()
    rows: list[dict[str, Any]]

    if model_path is None:
        assert ckpt is not None
        from anomaly._engine import Engine, image_paths

        accelerators = {"auto": "auto", "cpu": "cpu", "cuda": "gpu", "gpu": "gpu"}
        if wanted not in accelerators:
            msg = f"--device {device!r} is not one of {sorted(accelerators)!r} for --ckpt"
            raise ConfigError(msg)
        import torch

        if accelerators[wanted] == "gpu" and not torch.cuda.is_available():
            msg = f"--device {device!r} asked for, but torch sees no CUDA device; use cpu"
            raise ConfigError(msg)
        exported = Path(ckpt) / "metadata.json"
        if exported.is_file():
            try:
                found = json.loads(exported.read_text(encoding="utf-8")).get("format")
            except (OSError, UnicodeDecodeError, ValueError, AttributeError):
                found = None
            if isinstance(found, str) and found != "checkpoint":
                msg = f"{ckpt!r} is a {found!r} export; predict with --model {ckpt!r}"
                raise ConfigError(msg)
        quiet_lightning(verbosity())
        engine = Engine(plugin_manager=pm, accelerator=accelerators[wanted])
        model = engine.load_model(ckpt)
        image_paths(source)  # a missing or empty source fails before any folder is made
        results = ResultsFolder(Path(output))
        with results as folder:
            with progress_bar(not _quiet(ctx) and not as_json) as progress:
                engine.progress = progress
                result = engine.predict(
                    model,
                    source,
                    visualizer=chosen,
                    output_dir=folder / "images",
                    batch_size=batch_size,
                    keep_batches=False,
                )
            rows = [
                {
                    "image_path": row.image_path,
                    "pred_score": row.pred_score,
                    "pred_label": row.pred_label,
                }
                for row in result.predictions
            ]
            write_predictions(folder / "predictions.csv", result.predictions)
            write_json(folder / "predictions.json", rows)
    else:
        # Checkpoint-less: the export's own runtime through the inferencer registered for
        # its format. anomaly-deploy's errors cannot be imported here (core imports no
        # plugin), so they are recognised by the names the deploy contract fixes.
        def translated(err: Exception) -> AnomalyError | None:
            names = {kind.__name__ for kind in type(err).__mro__}
            if "DeployError" not in names:
                return None
            return (DataError if "InputError" in names else ConfigError)(str(err))

        def as_batch(prediction: Any) -> Any:
            """Turn a deploy ``Prediction`` into the one-image Batch visualizers draw."""
            import torch

            from anomaly._batch import Batch

            image = torch.from_numpy(prediction.image).permute(2, 0, 1).float() / 255.0
            return Batch(
                image=image[None],
                image_path=(prediction.source,),
                pred_score=torch.tensor([prediction.pred_score], dtype=torch.float32),
                pred_label=torch.tensor([int(prediction.pred_label)], dtype=torch.int64),
                anomaly_map=torch.from_numpy(prediction.anomaly_map)[None],
                pred_mask=torch.from_numpy(prediction.pred_mask)[None],
            )

        given = Path(model_path)
        metadata_file = (given if given.is_dir() else given.parent) / "metadata.json"
        if not given.exists():
            msg = f"export {model_path!r} does not exist; pass a folder written by 'anomaly export'"
            raise ConfigError(msg)
        try:
            metadata = json.loads(metadata_file.read_text(encoding="utf-8"))
            fmt = metadata["format"]
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as err:
            msg = (
                f"export metadata {str(metadata_file)!r} is missing or not valid ({err!r}); "
                "pass a folder written by 'anomaly export'"
            )
            raise ConfigError(msg) from err
        if fmt == "checkpoint":
            msg = f"{model_path!r} is a checkpoint export; predict with --ckpt {model_path!r}"
            raise ConfigError(msg)
        try:
            inferencer_class = pm.inferencer(str(fmt)).load()
        except UnknownNameError as err:
            msg = f"no inferencer for export format {fmt!r} of {model_path!r} ({err})"
            raise ConfigError(msg) from err
        try:
            inferencer = inferencer_class(  # type: ignore[operator]  # a registered class
                model_path, device="CPU" if wanted == "auto" else device
            )
            stream = inferencer.predict_source(source, batch_size=batch_size)
        except Exception as err:
            error = translated(err)
            if error is None:
                raise
            raise error from err
        total = getattr(stream, "total", None)
        rows = []
        results = ResultsFolder(Path(output))
        with results as folder:
            painter = None
            if chosen is not None:
                painter = pm.visualizer(chosen).load()(folder / "images")  # type: ignore[operator]
            with progress_bar(not _quiet(ctx) and not as_json) as progress:
                try:
                    for prediction in stream:
                        rows.append(
                            {
                                "image_path": prediction.source,
                                "pred_score": prediction.pred_score,
                                "pred_label": int(prediction.pred_label),
                            }
                        )
                        if painter is not None:
                            painter.visualize(as_batch(prediction))
                        if progress is not None:
                            progress("predict", len(rows), total)
                except KeyboardInterrupt:
                    if total is not None:
                        raise
                    # A camera runs until interrupted: keep what it has predicted.
                except Exception as err:
                    error = translated(err)
                    if error is None:
                        raise
                    raise error from err
            with (folder / "predictions.csv").open("w", newline="", encoding="utf-8") as handle:
                table = csv.writer(handle)
                table.writerow(["image_path", "pred_score", "pred_label", "gt_label"])
                for row in rows:
                    table.writerow(
                        [row["image_path"], f"{row['pred_score']:.6f}", row["pred_label"], ""]
                    )
            write_json(folder / "predictions.json", rows)
    if as_json:
        console.print_json(json.dumps({"results_dir": str(results.final), "predictions": rows}))
        return
    anomalous = sum(int(bool(row["pred_label"])) for row in rows)
    console.print(f"{len(rows)} images, {anomalous} anomalous")
    console.print(f"Results: [bold]{results.final}[/bold]")


@click.command(
    context_settings={
        **CONTEXT_SETTINGS,
        "ignore_unknown_options": False,
        "allow_extra_args": False,
    }
)
@click.option(
    "--ckpt",
    required=True,
    type=click.Path(),
    help="Checkpoint file (weights/model.ckpt of a run) or checkpoint export folder.",
)
@click.option(
    "--format",
    "fmt",
    default="torch",
    show_default=True,
    help="Export format: onnx, openvino, torch, checkpoint (see 'anomaly plugins').",
)
@click.option(
    "--precision",
    default=None,
    show_default="fp32",
    help="fp32, fp16 or int8; fp16 and int8 with --format openvino.",
)
@click.option(
    "--calibration",
    default=None,
    type=click.Path(),
    help="Folder of normal images to calibrate int8 with (e.g. the training images).",
)
@click.option(
    "--calibration-size",
    default=None,
    type=int,
    show_default="300",
    help="Most calibration images used for int8.",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False),
    default="results/export",
    show_default=True,
    help="Folder to write the export into (new or empty).",
)
def export(
    ckpt: str,
    fmt: str,
    precision: str | None,
    calibration: str | None,
    calibration_size: int | None,
    output: str,
) -> None:
    """Export a fitted model for deployment.

    Writes the model with its resizing, normalization and thresholds inside, plus a
    metadata.json, into --output. ONNX and OpenVINO exports run without torch (see
    'anomaly predict --model'); int8 needs --calibration images.

    \b
    Examples:
      anomaly export --ckpt results/.../weights/model.ckpt --format onnx -o deploy/onnx
      anomaly export --ckpt .../model.ckpt --format openvino --precision fp16 -o deploy/ov16
      anomaly export --ckpt .../model.ckpt --format openvino --precision int8 \\
          --calibration datasets/bottle/train/good -o deploy/ov8
    """
    from typing import Any

    from anomaly._engine import Engine
    from anomaly._errors import ConfigError

    pm = get_plugin_manager()
    pm.exporter(fmt)
    target = Path(output)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        msg = f"export folder {str(target)!r} is not empty; pick a new --output or empty it"
        raise ConfigError(msg)
    if calibration is not None and not Path(calibration).exists():
        msg = (
            f"calibration folder {calibration!r} does not exist; pass a folder of normal "
            f"images with --calibration"
        )
        raise ConfigError(msg)
    # Only options given on the command line reach the exporter, so formats without them
    # (checkpoint) keep working, and a misplaced option is named by the exporter.
    given: dict[str, Any] = {
        "precision": precision,
        "calibration": calibration,
        "calibration_size": calibration_size,
    }
    options = {key: value for key, value in given.items() if value is not None}
    engine = Engine(plugin_manager=pm)
    model = engine.load_model(ckpt)
    result = engine.export(model, target, format=fmt, **options)
    console.print(f"Exported ({result.format}): [bold]{result.path}[/bold]")
