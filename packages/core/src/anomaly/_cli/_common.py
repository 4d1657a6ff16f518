"""What the pipeline commands share: config options, building components, progress, output."""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import yaml
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from anomaly._cli._console import err_console, quiet_lightning
from anomaly._config import (
    RunConfig,
    apply_overrides,
    check_arguments,
    load_config_files,
    parse_overrides,
    resolve_config,
)
from anomaly._errors import ConfigError

if TYPE_CHECKING:
    from anomaly._datamodule import AnomalyDataModule, SplitSummary
    from anomaly._engine import Engine, EvaluationResult, ImagePrediction
    from anomaly._module import AnomalyModule
    from anomaly._plugins import PluginManager

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT_SETTINGS = {
    "help_option_names": ["-h", "--help"],
    "ignore_unknown_options": True,
    "allow_extra_args": True,
    "max_content_width": 100,
}

CONFIG_HELP = """\b
Configuration: every key of the YAML config is also an option, spelled as
its key path: --model NAME --model.KEY VALUE --data NAME --data.KEY VALUE
--engine.KEY VALUE --post_processing.KEY VALUE --export.formats [torch]
--metrics [image_auroc,aupro] --visualizer image|null --seed N
--results_dir DIR. Values are read as YAML (0.1, true, [8, 16]).
"""


def config_options(func: F) -> F:
    """Add ``--config`` (repeatable) and ``--json`` to a pipeline command."""
    func = click.option(
        "--json",
        "as_json",
        is_flag=True,
        default=False,
        show_default=True,
        help="Print the results as JSON on stdout.",
    )(func)
    return click.option(
        "--config",
        "-c",
        "configs",
        multiple=True,
        type=click.Path(dir_okay=False),
        help="YAML run config; repeat to merge (later wins).",
        show_default=True,
    )(func)


def load_run_config(configs: Sequence[str], extra: Sequence[str]) -> RunConfig:
    """Merge config files and command-line overrides into a checked ``RunConfig``."""
    data = load_config_files(configs)
    data = apply_overrides(data, parse_overrides(extra))
    return resolve_config(data)


def build_component(
    pm: PluginManager, section: str, name: str, arguments: Mapping[str, Any]
) -> Any:
    """Build a model or datamodule by registry name after checking its arguments."""
    spec = pm.model(name) if section == "model" else pm.datamodule(name)
    target = spec.load()
    check_arguments(section, target, arguments)
    try:
        return target(**arguments)  # type: ignore[operator]
    except TypeError as err:
        msg = f"bad arguments for {section} {name!r}: {err}"
        raise ConfigError(msg) from err


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch for a reproducible run."""
    import lightning.pytorch as pl

    pl.seed_everything(seed, verbose=False)


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Callable[[str, int, int | None], None] | None]:
    """Yield a ``progress(phase, done, total)`` callback drawing rich bars on stderr."""
    if not enabled:
        yield None
        return
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )
    tasks: dict[str, TaskID] = {}

    def update(phase: str, done: int, total: int | None) -> None:
        if phase not in tasks:
            tasks[phase] = progress.add_task(phase, total=total)
        progress.update(tasks[phase], completed=done, total=total)

    with progress:
        yield update


def splits_table(summaries: Sequence[SplitSummary]) -> Table:
    """Render how many images each split got, and from where."""
    table = Table(title="Data splits", title_justify="left")
    for column in ("split", "images", "normal", "abnormal", "masks", "from"):
        table.add_column(
            column,
            justify="right" if column in {"images", "normal", "abnormal", "masks"} else "left",
        )
    for item in summaries:
        table.add_row(
            item.split,
            str(item.images),
            str(item.normal),
            str(item.abnormal),
            str(item.masks),
            item.source,
        )
    return table


def metrics_table(result: EvaluationResult) -> Table:
    """Render metric values; n/a with the reason where one could not be computed."""
    table = Table(title=f"Test metrics ({result.images} images)", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result.metrics.items():
        shown = f"n/a ({result.notes.get(name, '')})" if math.isnan(value) else f"{value:.4f}"
        table.add_row(name, shown)
    return table


def metrics_json(result: EvaluationResult) -> dict[str, Any]:
    """Metrics as JSON-safe data (NaN becomes null with a note)."""
    return {
        "metrics": {k: (None if math.isnan(v) else v) for k, v in result.metrics.items()},
        "notes": dict(result.notes),
        "images": result.images,
        "test_seconds": round(result.seconds, 3),
        "images_per_second": round(result.images_per_second, 2),
    }


def write_predictions(path: Path, rows: Sequence[ImagePrediction]) -> None:
    """Write one CSV row per image: path, normalized score, predicted and true label."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_path", "pred_score", "pred_label", "gt_label"])
        for row in rows:
            writer.writerow(
                [
                    row.image_path,
                    f"{row.pred_score:.6f}",
                    row.pred_label,
                    "" if row.gt_label is None else row.gt_label,
                ]
            )


def write_json(path: Path, data: object) -> None:
    """Write indented JSON."""
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_yaml(path: Path, data: object) -> None:
    """Write a YAML document that a later ``--config`` reads back."""
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


class ResultsFolder:
    """A results folder written under a temporary name and renamed into place at the end.

    A failed run leaves nothing half-written: the temporary folder is removed.
    """

    def __init__(self, results_dir: Path, *parts: str) -> None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        safe = [part.replace(os.sep, "_").strip(". ") or "_" for part in parts if part]
        self.final = Path(results_dir, *safe, stamp)
        suffix = 1
        while self.final.exists():
            suffix += 1
            self.final = Path(results_dir, *safe, f"{stamp}-{suffix}")
        self.temp = self.final.with_name(f".{self.final.name}.partial")

    def relocate(self, path: Path) -> Path:
        """Return where ``path`` inside the temporary folder lives after the rename."""
        return self.final / path.relative_to(self.temp)

    def __enter__(self) -> Path:
        try:
            self.temp.mkdir(parents=True)
        except OSError as err:
            msg = (
                f"results folder {str(self.final.parent)!r} cannot be created ({err.strerror}); "
                f"pick another --results_dir"
            )
            raise ConfigError(msg) from err
        return self.temp

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.temp.rename(self.final)
        else:
            shutil.rmtree(self.temp, ignore_errors=True)


def prepare(
    config: RunConfig, pm: PluginManager, *, need_data: bool = True
) -> tuple[AnomalyModule | None, AnomalyDataModule | None]:
    """Check names and build model and datamodule, validating data, before any work."""
    set_seed(config.seed)
    for name in config.metrics:
        pm.metric(name)
    if config.visualizer is not None:
        pm.visualizer(config.visualizer)
    for name in config.export_formats:
        pm.exporter(name)
    from anomaly._module import AnomalyModule

    model = build_component(pm, "model", config.model.name, config.model.init_args)
    if not isinstance(model, AnomalyModule):
        msg = (
            f"model {config.model.name!r} does not build an AnomalyModule; "
            f"report it to its plugin's authors"
        )
        raise ConfigError(msg)
    from anomaly.post_processing import PostProcessor

    check_arguments("post_processing", PostProcessor, config.post_processing)
    model.post_processor = PostProcessor(**config.post_processing)
    datamodule = None
    if need_data:
        datamodule = build_component(pm, "data", config.data.name, config.data.init_args)
        datamodule.setup()
    return model, datamodule


def make_engine(
    config: RunConfig, pm: PluginManager, progress: Callable[[str, int, int | None], None] | None
) -> Engine:
    """Build the Engine with the config's trainer arguments."""
    from anomaly._engine import Engine

    quiet_lightning(verbosity())
    return Engine(plugin_manager=pm, progress=progress, **dict(config.engine))


def verbosity() -> int:
    """Return the ``-v`` count of the running command (0 outside the CLI)."""
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    return int(obj.get("verbose", 0)) if isinstance(obj, dict) else 0


def data_label(config: RunConfig) -> list[str]:
    """Folder parts naming the data of a run: datamodule name and category when there is one."""
    parts = [config.data.name]
    category = config.data.init_args.get("category")
    if isinstance(category, str):
        parts.append(category)
    return parts
