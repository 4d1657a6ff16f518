"""Hook specifications: the whole contract between anomaly and its plugins.

A plugin is a distribution with an entry point in the group ``anomaly`` that names a module
of hook implementations, each a module-level function marked with ``anomaly.hookimpl`` and
named like the specification below. Registration hooks take no arguments and return a
sequence of specs; every plugin is called separately, so each spec records its provider.
"""

from __future__ import annotations

from collections.abc import Sequence

import pluggy

from anomaly._specs import (
    BackboneSpec,
    CommandSpec,
    DataModuleSpec,
    ExporterSpec,
    InferencerSpec,
    MetricSpec,
    ModelSpec,
    VisualizerSpec,
)

__all__ = [
    "PROJECT_NAME",
    "anomaly_register_backbones",
    "anomaly_register_commands",
    "anomaly_register_datamodules",
    "anomaly_register_exporters",
    "anomaly_register_inferencers",
    "anomaly_register_metrics",
    "anomaly_register_models",
    "anomaly_register_visualizers",
    "hookimpl",
]

PROJECT_NAME = "anomaly"
_hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# --- components for training ------------------------------------------------------------


@_hookspec
def anomaly_register_models() -> Sequence[ModelSpec]:
    """Return the models this plugin provides.

    Called once per plugin when the plugin manager first loads plugins (on the first
    lookup or listing of any component).
    Each spec's target names an ``anomaly.AnomalyModule`` subclass.
    """
    raise NotImplementedError


@_hookspec
def anomaly_register_datamodules() -> Sequence[DataModuleSpec]:
    """Return the datamodules this plugin provides.

    Called once per plugin when the plugin manager first loads plugins (on the first
    lookup or listing of any component). Each spec's target
    names an ``anomaly.AnomalyDataModule`` subclass.
    """
    raise NotImplementedError


@_hookspec
def anomaly_register_backbones() -> Sequence[BackboneSpec]:
    """Return offline weight providers for timm backbones.

    Called once per plugin when the plugin manager first loads plugins (on the first
    lookup or listing of any component).
    Each spec's name is a timm model name and its target a callable that takes no arguments
    and returns a local weight file path or a state dict for that model.
    """
    raise NotImplementedError


# --- components for evaluation ---------------------------------------------------------


@_hookspec
def anomaly_register_metrics() -> Sequence[MetricSpec]:
    """Return the metrics this plugin provides.

    Called once per plugin when the plugin manager first loads plugins (on the first
    lookup or listing of any component). Each spec's target names
    an ``anomaly.metrics.AnomalyMetric`` subclass.
    """
    raise NotImplementedError


@_hookspec
def anomaly_register_visualizers() -> Sequence[VisualizerSpec]:
    """Return the visualizers this plugin provides.

    Called once per plugin when the plugin manager first loads plugins (on the first
    lookup or listing of any component). Each spec's target
    names an ``anomaly.visualizers.Visualizer`` subclass.
    """
    raise NotImplementedError


# --- components for deployment ---------------------------------------------------------


@_hookspec
def anomaly_register_exporters() -> Sequence[ExporterSpec]:
    """Return the exporters this plugin provides.

    Called once per plugin when the plugin manager first loads plugins (on the first
    lookup or listing of any component). Each spec's
    target is a callable ``(module, directory, **options) -> pathlib.Path``.
    """
    raise NotImplementedError


@_hookspec
def anomaly_register_inferencers() -> Sequence[InferencerSpec]:
    """Return the inferencers this plugin provides.

    Called once per plugin when the plugin manager first loads plugins (on the first
    lookup or listing of any component). Each spec's target
    names a class whose constructor takes the path of an export folder.
    """
    raise NotImplementedError


# --- command line ------------------------------------------------------------------------


@_hookspec
def anomaly_register_commands() -> Sequence[CommandSpec]:
    """Return extra ``anomaly`` CLI commands.

    Called once per plugin when the plugin manager first loads plugins (the CLI lists
    commands at start). Each spec's target names a ``click.Command``; a name that
    clashes with a built-in command is skipped with a warning.
    """
    raise NotImplementedError
