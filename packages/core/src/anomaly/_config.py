"""Run configuration: YAML files and ``--section.key value`` overrides into frozen dataclasses.

Precedence: command line > ``--config`` files (later wins) > defaults. Relative paths inside a
config file are resolved against that file's folder.
"""

from __future__ import annotations

import copy
import difflib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from anomaly._errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG",
    "EXPORT_PRECISIONS",
    "ComponentConfig",
    "RunConfig",
    "apply_overrides",
    "check_arguments",
    "load_config_files",
    "parse_overrides",
    "resolve_config",
]

DEFAULT_METRICS = (
    "image_auroc",
    "image_f1",
    "image_f1_max",
    "pixel_auroc",
    "pixel_f1_max",
    "aupro",
)

DEFAULT_CONFIG: dict[str, Any] = {
    "model": {"name": "patchcore"},
    "data": {"name": "demo"},
    "engine": {},
    "post_processing": {},
    "export": {"formats": ["torch"], "precision": "fp32"},
    "metrics": list(DEFAULT_METRICS),
    "visualizer": "image",
    "seed": 0,
    "results_dir": "results",
}
_COMPONENT_SECTIONS = ("model", "data")
_EXPORT_KEYS = ("formats", "precision")
EXPORT_PRECISIONS = ("fp32", "fp16", "int8")
_MAPPING_SECTIONS = ("model", "data", "engine", "post_processing", "export")
# Keys whose string values are paths, resolved against the config file that sets them.
_PATH_KEYS = {
    ("data", "root"),
    ("model", "pretrained_weights"),
    ("results_dir",),
}


@dataclass(frozen=True, slots=True)
class ComponentConfig:
    """A registry name and the constructor arguments of that component."""

    name: str
    init_args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Everything one ``anomaly run`` needs, checked before any work starts."""

    model: ComponentConfig
    data: ComponentConfig
    engine: Mapping[str, Any]
    post_processing: Mapping[str, Any]
    export_formats: tuple[str, ...]
    metrics: tuple[str, ...]
    visualizer: str | None
    seed: int
    results_dir: Path
    export_precision: str = "fp32"

    def to_dict(self) -> dict[str, Any]:
        """Return the config as plain data, in the YAML layout that reproduces the run."""
        return {
            "model": {"name": self.model.name, **dict(self.model.init_args)},
            "data": {"name": self.data.name, **dict(self.data.init_args)},
            "engine": dict(self.engine),
            "post_processing": dict(self.post_processing),
            "export": {"formats": list(self.export_formats), "precision": self.export_precision},
            "metrics": list(self.metrics),
            "visualizer": self.visualizer,
            "seed": self.seed,
            "results_dir": str(self.results_dir),
        }


def _closest(word: str, options: Sequence[str]) -> str:
    match = difflib.get_close_matches(word, list(options), n=1)
    return f"; did you mean {match[0]!r}?" if match else f"; expected one of {', '.join(options)}"


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    for key_path in _PATH_KEYS:
        node: Any = data
        for key in key_path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        leaf = key_path[-1]
        if isinstance(node, dict) and isinstance(node.get(leaf), str):
            path = Path(node[leaf]).expanduser()
            node[leaf] = str(path if path.is_absolute() else (base / path))


def load_config_files(paths: Sequence[str | Path]) -> dict[str, Any]:
    """Load and merge YAML run configs (later files win); paths become file-relative.

    Raises:
        ConfigError: When a file is missing, is not valid YAML or is not a mapping.
    """
    merged: dict[str, Any] = {}
    for raw_path in paths:
        path = Path(raw_path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            msg = f"config file {str(path)!r} cannot be read ({err.strerror}); check the path"
            raise ConfigError(msg) from err
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            line = f" at line {where.line + 1}" if where is not None else ""
            msg = f"config file {str(path)!r} is not valid YAML{line}; fix its syntax"
            raise ConfigError(msg) from err
        if data is None:
            data = {}
        if not isinstance(data, dict):
            msg = (
                f"config file {str(path)!r} must hold a mapping of sections, "
                f"got {type(data).__name__}"
            )
            raise ConfigError(msg)
        _resolve_paths(data, path.resolve().parent)
        merged = _merge(merged, data)
    return merged


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    result = copy.deepcopy(base)
    for key, value in update.items():
        if (
            key in _COMPONENT_SECTIONS
            and isinstance(value, dict)
            and isinstance(result.get(key), dict)
        ):
            # A different component name starts its arguments afresh.
            if "name" in value and value["name"] != result[key].get("name"):
                result[key] = {}
            result[key].update(copy.deepcopy(value))
        elif (
            key in _MAPPING_SECTIONS
            and isinstance(value, dict)
            and isinstance(result.get(key), dict)
        ):
            result[key].update(copy.deepcopy(value))
        else:
            result[key] = copy.deepcopy(value)
    return result


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """Turn ``--model padim --model.backbone x --seed 3`` into a nested mapping.

    Values are parsed as YAML scalars (``0.1``, ``true``, ``[8, 16]``); ``--key=value`` works too.

    Raises:
        ConfigError: On a stray argument or an option without a value.
    """
    result: dict[str, Any] = {}
    items = list(args)
    index = 0
    while index < len(items):
        token = items[index]
        if not token.startswith("--") or len(token) <= 2:
            msg = f"unexpected argument {token!r}; options look like --model.backbone VALUE"
            raise ConfigError(msg)
        key, has_value, value = token[2:].partition("=")
        if not has_value:
            if index + 1 >= len(items) or items[index + 1].startswith("--"):
                msg = f"option {token!r} needs a value"
                raise ConfigError(msg)
            value = items[index + 1]
            index += 1
        index += 1
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        section, _, rest = key.partition(".")
        section = section.replace("-", "_")
        if not rest:
            if section in _COMPONENT_SECTIONS:
                result.setdefault(section, {})["name"] = parsed
            else:
                result[section] = parsed
        else:
            node = result.setdefault(section, {})
            if not isinstance(node, dict):
                msg = f"option {token!r} sets a key inside {section!r}, which is not a section"
                raise ConfigError(msg)
            parts = rest.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = parsed
    return result


def apply_overrides(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Merge command-line overrides on top of a loaded config."""
    return _merge(base, overrides)


def _section(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        msg = f"config section {key!r} must be a mapping, got {value!r}"
        raise ConfigError(msg)
    return dict(value)


def resolve_config(data: Mapping[str, Any]) -> RunConfig:
    """Check a merged config mapping and freeze it; defaults fill what is missing.

    Raises:
        ConfigError: Naming the key path and the closest valid key for unknown keys or bad values.
    """
    for key in data:
        if key not in DEFAULT_CONFIG:
            msg = f"unknown config key {key!r}{_closest(key, list(DEFAULT_CONFIG))}"
            raise ConfigError(msg)
    merged = _merge(DEFAULT_CONFIG, data)
    components = {}
    for key in _COMPONENT_SECTIONS:
        section = _section(merged, key)
        name = section.pop("name", None)
        if not isinstance(name, str) or not name:
            msg = f"config key '{key}.name' must name a registered {key}, got {name!r}"
            raise ConfigError(msg)
        components[key] = ComponentConfig(name=name, init_args=section)
    export = _section(merged, "export")
    for key in export:
        if key not in _EXPORT_KEYS:
            msg = f"unknown config key 'export.{key}'{_closest(key, list(_EXPORT_KEYS))}"
            raise ConfigError(msg)
    precision = export.get("precision", "fp32")
    if precision not in EXPORT_PRECISIONS:
        msg = (
            f"config key 'export.precision' must be one of {list(EXPORT_PRECISIONS)!r}, "
            f"got {precision!r}"
        )
        raise ConfigError(msg)
    formats = export.get("formats", [])
    formats = [formats] if isinstance(formats, str) else formats
    metrics = merged["metrics"]
    metrics = [metrics] if isinstance(metrics, str) else metrics
    for key, value in (("export.formats", formats), ("metrics", metrics)):
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            msg = f"config key {key!r} must be a list of names, got {value!r}"
            raise ConfigError(msg)
    visualizer = merged["visualizer"]
    if visualizer is not None and (not isinstance(visualizer, str) or not visualizer):
        msg = f"config key 'visualizer' must be a name or null, got {visualizer!r}"
        raise ConfigError(msg)
    seed = merged["seed"]
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        msg = f"config key 'seed' must be a non-negative integer, got {seed!r}"
        raise ConfigError(msg)
    results_dir = merged["results_dir"]
    if not isinstance(results_dir, str) or not results_dir:
        msg = f"config key 'results_dir' must be a folder path, got {results_dir!r}"
        raise ConfigError(msg)
    return RunConfig(
        model=components["model"],
        data=components["data"],
        engine=_section(merged, "engine"),
        post_processing=_section(merged, "post_processing"),
        export_formats=tuple(formats),
        metrics=tuple(metrics),
        visualizer=visualizer,
        seed=seed,
        results_dir=Path(results_dir),
        export_precision=precision,
    )


def check_arguments(section: str, target: object, arguments: Mapping[str, Any]) -> None:
    """Check that ``target``'s constructor accepts every key of ``arguments``.

    Raises:
        ConfigError: Naming ``section.key`` and the closest parameter for unknown keys, or
            naming a missing required parameter.
    """
    signature = inspect.signature(target)  # type: ignore[arg-type]  # classes and callables
    parameters = {
        name: parameter
        for name, parameter in signature.parameters.items()
        if parameter.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }
    accepts_any = any(
        parameter.kind is inspect.Parameter.VAR_KEYWORD
        for parameter in signature.parameters.values()
    )
    for key in arguments:
        if key not in parameters and not accepts_any:
            known = sorted(parameters)
            msg = (
                f"unknown config key '{section}.{key}'{_closest(key, known)} "
                f"(accepted: {', '.join(known) or 'none'})"
            )
            raise ConfigError(msg)
    for name, parameter in parameters.items():
        if parameter.default is inspect.Parameter.empty and name not in arguments:
            msg = f"config key '{section}.{name}' is required; set it with --{section}.{name} VALUE"
            raise ConfigError(msg)
