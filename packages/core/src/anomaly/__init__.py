"""anomaly: visual anomaly detection with a plugin core.

Importing ``anomaly`` is light: torch and Lightning are imported only when a name that needs
them (``Engine``, ``AnomalyModule``, ...) is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from anomaly._errors import (
    AnomalyDeprecationWarning,
    AnomalyError,
    AnomalyWarning,
    BackboneWeightsError,
    ConfigError,
    DataError,
    ExportError,
    PluginLoadError,
    PluginLoadWarning,
    RegistryConflictError,
    UnknownNameError,
)
from anomaly._plugins import PluginManager, get_plugin_manager, reset_plugin_manager
from anomaly._specs import (
    BackboneSpec,
    CommandSpec,
    ComponentKind,
    DataModuleSpec,
    ExporterSpec,
    InferencerSpec,
    MetricSpec,
    ModelSpec,
    VisualizerSpec,
)
from anomaly.hookspecs import hookimpl

if TYPE_CHECKING:
    from anomaly._batch import Batch
    from anomaly._datamodule import AnomalyDataModule, SplitSummary
    from anomaly._engine import Engine, EvaluationResult, ExportResult, FitResult
    from anomaly._module import AnomalyModule, LearningType

__version__ = "0.1.0"

_LAZY = {
    "AnomalyDataModule": "anomaly._datamodule",
    "AnomalyModule": "anomaly._module",
    "Batch": "anomaly._batch",
    "Engine": "anomaly._engine",
    "EvaluationResult": "anomaly._engine",
    "ExportResult": "anomaly._engine",
    "FitResult": "anomaly._engine",
    "LearningType": "anomaly._module",
    "SplitSummary": "anomaly._datamodule",
}

__all__ = [
    "AnomalyDataModule",
    "AnomalyDeprecationWarning",
    "AnomalyError",
    "AnomalyModule",
    "AnomalyWarning",
    "BackboneSpec",
    "BackboneWeightsError",
    "Batch",
    "CommandSpec",
    "ComponentKind",
    "ConfigError",
    "DataError",
    "DataModuleSpec",
    "Engine",
    "EvaluationResult",
    "ExportError",
    "ExportResult",
    "ExporterSpec",
    "FitResult",
    "InferencerSpec",
    "LearningType",
    "MetricSpec",
    "ModelSpec",
    "PluginLoadError",
    "PluginLoadWarning",
    "PluginManager",
    "RegistryConflictError",
    "SplitSummary",
    "UnknownNameError",
    "VisualizerSpec",
    "__version__",
    "get_plugin_manager",
    "hookimpl",
    "reset_plugin_manager",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        msg = f"module 'anomaly' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
