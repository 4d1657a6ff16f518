"""``anomaly run``: fit, test, export and report from one config."""

from __future__ import annotations

import inspect
import json
import typing
from pathlib import Path
from typing import Any

import click

from anomaly._cli._common import (
    CONFIG_HELP,
    CONTEXT_SETTINGS,
    ResultsFolder,
    config_options,
    data_label,
    load_run_config,
    make_engine,
    metrics_json,
    metrics_table,
    prepare,
    progress_bar,
    splits_table,
    write_json,
    write_predictions,
    write_yaml,
)
from anomaly._cli._console import console, err_console
from anomaly._errors import ConfigError
from anomaly._plugins import PluginManager, get_plugin_manager


def _export_options(pm: PluginManager, fmt: str, precision: str) -> dict[str, Any]:
    """Return the options ``anomaly run`` passes to exporter ``fmt``, checked before training.

    ``export.precision`` goes to every exporter that takes a ``precision`` argument; one that
    does not (the checkpoint) writes full precision, so anything else is an error. When the
    exporter annotates ``precision`` with a ``Literal``, the value is checked against it
    here, so that a run does not fail only after training.

    Raises:
        ConfigError: When ``fmt`` cannot export at ``precision``.
    """
    exporter = pm.exporter(fmt).load()
    try:
        parameter = inspect.signature(exporter).parameters.get("precision")  # type: ignore[arg-type]
    except (TypeError, ValueError):  # callables without a signature take no precision
        parameter = None
    if parameter is None or parameter.kind is inspect.Parameter.VAR_KEYWORD:
        if precision != "fp32":
            msg = (
                f"export format {fmt!r} has no precision option, so export.precision "
                f"{precision!r} cannot apply; export it in a separate run or use fp32"
            )
            raise ConfigError(msg)
        return {}
    try:
        hints = typing.get_type_hints(exporter)
    except (NameError, TypeError):  # annotations that do not resolve: leave it to the exporter
        hints = {}
    allowed = typing.get_args(hints.get("precision"))
    if typing.get_origin(hints.get("precision")) is typing.Literal and precision not in allowed:
        msg = (
            f"export format {fmt!r} writes precision {list(allowed)!r}, not {precision!r}; "
            f"set export.precision to one of them or pick other export.formats"
        )
        raise ConfigError(msg)
    return {"precision": precision}


@click.command(context_settings=CONTEXT_SETTINGS, epilog=CONFIG_HELP)
@config_options
@click.pass_context
def run(ctx: click.Context, configs: tuple[str, ...], as_json: bool) -> None:
    """Fit, test, export and report in one go.

    Trains the model on the training split, learns thresholds on the validation split,
    tests with every configured metric, writes heat-map images, exports the model and
    saves the resolved config, all under one new results folder. With no options it trains
    PatchCore on the built-in demo dataset, which needs no download.

    \b
    Examples:
      anomaly run
      anomaly run --model padim --data mvtec_ad --data.root ./mvtec --data.category bottle
      anomaly run --config run.yaml --model.coreset_ratio 0.05
    """
    config = load_run_config(configs, ctx.args)
    pm = get_plugin_manager()
    export_options = {
        fmt: _export_options(pm, fmt, config.export_precision) for fmt in config.export_formats
    }
    model, datamodule = prepare(config, pm)
    assert model is not None
    assert datamodule is not None
    quiet = bool(ctx.find_root().obj.get("quiet")) if ctx.find_root().obj else False
    if not as_json:
        err_console.print(splits_table(datamodule.summaries))
    results = ResultsFolder(config.results_dir, config.model.name, *data_label(config))
    with results as folder:
        write_yaml(folder / "config.yaml", config.to_dict())
        with progress_bar(not quiet and not as_json) as progress:
            engine = make_engine(config, pm, progress)
            fitted = engine.fit(model, datamodule)
            engine.save_checkpoint(model, folder / "weights" / "model.ckpt")
            result = engine.test(
                model,
                datamodule,
                metrics=config.metrics,
                visualizer=config.visualizer,
                output_dir=folder / "images",
            )
        exports = {
            fmt: str(
                engine.export(
                    model,
                    folder / "export" / fmt,
                    format=fmt,
                    datamodule=datamodule,
                    **export_options[fmt],
                ).path
            )
            for fmt in config.export_formats
        }
        report = {
            "model": config.model.name,
            "data": config.data.name,
            **metrics_json(result),
            "fit_seconds": round(fitted.seconds, 3),
            "train_images": fitted.train_images,
            "thresholds": {"image": fitted.image_threshold, "pixel": fitted.pixel_threshold},
        }
        write_json(folder / "metrics.json", report)
        write_predictions(folder / "predictions.csv", result.predictions)
    if as_json:
        report["results_dir"] = str(results.final)
        report["exports"] = {
            fmt: str(results.relocate(Path(path))) for fmt, path in exports.items()
        }
        console.print_json(json.dumps(report))
        return
    console.print(metrics_table(result))
    console.print(
        f"fit {fitted.seconds:.1f} s on {fitted.train_images} images · "
        f"test {result.images_per_second:.1f} images/s"
    )
    console.print(f"Results: [bold]{results.final}[/bold]")
