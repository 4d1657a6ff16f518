"""The one hierarchy of errors and warnings of anomaly and its plugins."""

from __future__ import annotations

__all__ = [
    "AnomalyDeprecationWarning",
    "AnomalyError",
    "AnomalyWarning",
    "BackboneWeightsError",
    "ConfigError",
    "DataError",
    "ExportError",
    "PluginLoadError",
    "PluginLoadWarning",
    "RegistryConflictError",
    "UnknownNameError",
]


class AnomalyError(Exception):
    """Base of every error anomaly raises on purpose; the CLI prints it as one line."""


class ConfigError(AnomalyError, ValueError):
    """A configuration key or value is invalid."""


class UnknownNameError(AnomalyError, LookupError):
    """A registry name (model, datamodule, metric, ...) does not exist."""


class RegistryConflictError(AnomalyError):
    """Two distributions register the same name for one kind of component."""


class PluginLoadError(AnomalyError):
    """A plugin failed to import or register while strict plugin loading is on."""


class DataError(AnomalyError):
    """Input data is missing, empty, unreadable or inconsistent."""


class BackboneWeightsError(AnomalyError):
    """Pretrained weights for a backbone are missing or do not fit it."""


class ExportError(AnomalyError):
    """A model cannot be exported or an export cannot be loaded."""


class AnomalyWarning(UserWarning):
    """Base of every warning anomaly emits."""


class PluginLoadWarning(AnomalyWarning):
    """A plugin failed to import or register and was skipped."""


class AnomalyDeprecationWarning(AnomalyWarning, DeprecationWarning):
    """A public name or behaviour will change after the next minor release."""
