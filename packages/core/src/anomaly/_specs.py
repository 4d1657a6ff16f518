"""Frozen descriptions of the components that plugins register."""

from __future__ import annotations

import enum
import importlib
import re
from dataclasses import dataclass, field

__all__ = [
    "BackboneSpec",
    "CommandSpec",
    "ComponentKind",
    "DataModuleSpec",
    "ExporterSpec",
    "InferencerSpec",
    "MetricSpec",
    "ModelSpec",
    "Spec",
    "VisualizerSpec",
    "load_target",
]

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


class ComponentKind(enum.StrEnum):
    """The kinds of component a plugin can register, one registry each."""

    MODEL = "models"
    DATAMODULE = "datamodules"
    METRIC = "metrics"
    VISUALIZER = "visualizers"
    EXPORTER = "exporters"
    INFERENCER = "inferencers"
    BACKBONE = "backbones"
    COMMAND = "commands"


def load_target(target: str) -> object:
    """Import ``"package.module:attribute"`` and return the attribute.

    Raises:
        ImportError: When the module cannot be imported or lacks the attribute.
    """
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        msg = f"target {target!r} is not of the form 'module:attribute'"
        raise ImportError(msg)
    module = importlib.import_module(module_name)
    obj: object = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as err:
            msg = f"module {module_name!r} has no attribute {attribute!r}"
            raise ImportError(msg) from err
    return obj


@dataclass(frozen=True, slots=True, kw_only=True)
class Spec:
    """What every registered component has.

    Attributes:
        name: Registry name, ``^[a-z][a-z0-9_]*$``.
        target: ``"module:attribute"`` of the class or callable, imported on first use.
        summary: One line for ``anomaly models`` and ``anomaly plugins``.
        provider: Distribution that registered the spec; filled in by the registry.
    """

    kind: ComponentKind = field(init=False, default=ComponentKind.MODEL)
    name: str
    target: str
    summary: str = ""
    provider: str = ""

    def __post_init__(self) -> None:
        if not NAME_PATTERN.match(self.name):
            msg = f"registry name {self.name!r} must match {NAME_PATTERN.pattern}"
            raise ValueError(msg)
        if ":" not in self.target:
            msg = f"target {self.target!r} of {self.name!r} must be 'module:attribute'"
            raise ValueError(msg)

    def load(self) -> object:
        """Import and return the target."""
        return load_target(self.target)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec(Spec):
    """A model: target is an ``AnomalyModule`` subclass.

    Attributes:
        family: ``memory``, ``flow``, ``reconstruction``, ... for grouping in listings.
    """

    kind: ComponentKind = field(init=False, default=ComponentKind.MODEL)
    family: str = "other"


@dataclass(frozen=True, slots=True, kw_only=True)
class DataModuleSpec(Spec):
    """A datamodule: target is an ``AnomalyDataModule`` subclass."""

    kind: ComponentKind = field(init=False, default=ComponentKind.DATAMODULE)


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricSpec(Spec):
    """A metric: target is an ``anomaly.metrics.AnomalyMetric`` subclass.

    Attributes:
        level: ``image`` or ``pixel``: which fields of a batch the metric reads.
    """

    kind: ComponentKind = field(init=False, default=ComponentKind.METRIC)
    level: str = "image"


@dataclass(frozen=True, slots=True, kw_only=True)
class VisualizerSpec(Spec):
    """A visualizer: target is an ``anomaly.visualizers.Visualizer`` subclass."""

    kind: ComponentKind = field(init=False, default=ComponentKind.VISUALIZER)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExporterSpec(Spec):
    """An exporter: target is a callable ``(module, directory, **options) -> Path``."""

    kind: ComponentKind = field(init=False, default=ComponentKind.EXPORTER)


@dataclass(frozen=True, slots=True, kw_only=True)
class InferencerSpec(Spec):
    """An inferencer: target is a class built from an export folder."""

    kind: ComponentKind = field(init=False, default=ComponentKind.INFERENCER)


@dataclass(frozen=True, slots=True, kw_only=True)
class BackboneSpec(Spec):
    """An offline weight provider for one timm model.

    ``name`` is the timm model name; ``target`` is a callable taking no arguments and
    returning the path of a local weight file (or a state dict) for that model.
    """

    kind: ComponentKind = field(init=False, default=ComponentKind.BACKBONE)


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandSpec(Spec):
    """An extra CLI command: target is a ``click.Command``."""

    kind: ComponentKind = field(init=False, default=ComponentKind.COMMAND)
