"""``anomaly models``: the models every installed plugin registers.

Lists specs only: no model class is imported, so neither torch nor Lightning is. A name
registered by two plugins raises ``RegistryConflictError`` here (exit code 1).
"""

from __future__ import annotations

import json
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from anomaly._cli._console import console
from anomaly._plugins import get_plugin_manager
from anomaly._specs import ModelSpec

__all__ = ["model_rows", "models"]


def model_rows(specs: list[ModelSpec]) -> list[dict[str, Any]]:
    """Return one JSON-ready record per model, sorted by family then name.

    Keys: ``name``, ``family``, ``package`` (the distribution that registers it), ``summary``
    and ``target`` (``"module:attribute"`` of the class).
    """
    return [
        {
            "name": spec.name,
            "family": spec.family,
            "package": spec.provider,
            "summary": spec.summary,
            "target": spec.target,
        }
        for spec in sorted(specs, key=lambda spec: (spec.family, spec.name))
    ]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    default=False,
    show_default=True,
    help="Print plain JSON on stdout instead of a table.",
)
def models(as_json: bool) -> None:
    """List the models that installed plugins provide.

    Shows each model's registry name (what --model takes), its family, the package that
    provides it and a one-line summary. Install more models with pip (for example
    anomaly-models-flow); 'anomaly plugins' shows what is installed.

    \b
    Examples:
      anomaly models
      anomaly models --json
      anomaly fit --model example_distance
    """
    specs = [
        spec
        for spec in get_plugin_manager().specs("models").values()
        if isinstance(spec, ModelSpec)
    ]
    rows = model_rows(specs)
    if as_json:
        click.echo(json.dumps({"models": rows}, indent=2))
        return
    if not rows:
        console.print(
            "No models are registered. Install a model plugin, for example "
            "'pip install anomaly-models-memory', and check it with 'anomaly plugins'.",
            highlight=False,
        )
        return
    table = Table(title="anomaly models", title_justify="left")
    table.add_column("Name", no_wrap=True, style="bold")
    table.add_column("Family", no_wrap=True)
    table.add_column("Package", no_wrap=True)
    table.add_column("Summary")
    for row in rows:
        table.add_row(
            Text(row["name"]), Text(row["family"]), Text(row["package"]), Text(row["summary"])
        )
    console.print(table)
