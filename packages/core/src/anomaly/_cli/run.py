"""``anomaly run``: fit, test, export and report from one config."""

from __future__ import annotations

import json
from pathlib import Path

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
from anomaly._plugins import get_plugin_manager


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
            fmt: str(engine.export(model, folder / "export" / fmt, format=fmt).path)
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
