"""Plugin discovery, guarded loading and the per-kind registries."""

from __future__ import annotations

import difflib
import enum
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar, cast

import importlib_metadata
import pluggy

from anomaly import hookspecs
from anomaly._errors import (
    PluginLoadError,
    PluginLoadWarning,
    RegistryConflictError,
    UnknownNameError,
)
from anomaly._specs import (
    BackboneSpec,
    CommandSpec,
    ComponentKind,
    DataModuleSpec,
    ExporterSpec,
    InferencerSpec,
    MetricSpec,
    ModelSpec,
    Spec,
    VisualizerSpec,
)


__all__ = [
    "ENTRY_POINT_GROUP",
    "PluginInfo",
    "PluginManager",
    "PluginStatus",
    "get_plugin_manager",
    "reset_plugin_manager",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "anomaly"
_HOOK_OF_KIND: dict[ComponentKind, str] = {
    ComponentKind.MODEL: "anomaly_register_models",
    ComponentKind.DATAMODULE: "anomaly_register_datamodules",
    ComponentKind.METRIC: "anomaly_register_metrics",
    ComponentKind.VISUALIZER: "anomaly_register_visualizers",
    ComponentKind.EXPORTER: "anomaly_register_exporters",
    ComponentKind.INFERENCER: "anomaly_register_inferencers",
    ComponentKind.BACKBONE: "anomaly_register_backbones",
    ComponentKind.COMMAND: "anomaly_register_commands",
}
_SPEC_OF_KIND: dict[ComponentKind, type[Spec]] = {
    ComponentKind.MODEL: ModelSpec,
    ComponentKind.DATAMODULE: DataModuleSpec,
    ComponentKind.METRIC: MetricSpec,
    ComponentKind.VISUALIZER: VisualizerSpec,
    ComponentKind.EXPORTER: ExporterSpec,
    ComponentKind.INFERENCER: InferencerSpec,
    ComponentKind.BACKBONE: BackboneSpec,
    ComponentKind.COMMAND: CommandSpec,
}
SpecT = TypeVar("SpecT", bound=Spec)


class PluginStatus(enum.StrEnum):
    """State of one plugin in ``anomaly plugins``."""

    OK = "ok"
    BLOCKED = "blocked"
    BROKEN = "broken"
    CONFLICT = "conflict"


@dataclass(slots=True)
class PluginInfo:
    """One plugin: where it comes from, what it registers and whether it loaded.

    Attributes:
        distribution: Distribution name, e.g. ``anomaly-models-memory``.
        version: Distribution version.
        entry_point: Entry point name in the group ``anomaly``, or the name it was registered
            under by hand.
        status: ``ok``, ``blocked`` (switched off by an environment variable), ``broken``
            (failed to import or register), ``conflict`` (a name clashes with another plugin).
        reason: Why the plugin is not ``ok``.
        hooks: Names of the hooks it implements.
        specs: What it registered, per kind.
    """

    distribution: str
    version: str
    entry_point: str
    status: PluginStatus = PluginStatus.OK
    reason: str = ""
    hooks: list[str] = field(default_factory=list)
    specs: dict[ComponentKind, list[Spec]] = field(default_factory=dict)

    def names(self, kind: ComponentKind) -> list[str]:
        """Return the names this plugin registers for ``kind``."""
        return [spec.name for spec in self.specs.get(kind, [])]


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _normalize(distribution: str) -> str:
    return distribution.lower().replace("_", "-").replace(".", "-")


class PluginManager:
    """Find plugins through entry points, load each in a guarded step and keep the registries.

    Discovery happens on first use. ``strict`` (default: ``ANOMALY_STRICT_PLUGINS``) raises
    ``PluginLoadError`` instead of warning when a plugin cannot be loaded.
    """

    def __init__(self, *, strict: bool | None = None, discover: bool = True) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self.strict = _env_flag("ANOMALY_STRICT_PLUGINS") if strict is None else strict
        self._discover = discover
        self._loaded = False
        self._plugins: dict[str, PluginInfo] = {}
        self._registries: dict[ComponentKind, dict[str, Spec]] = {}
        if _env_flag("ANOMALY_TRACE_PLUGINS"):
            self._pm.trace.root.setwriter(lambda message: logger.debug("%s", message.rstrip()))
            self._pm.enable_tracing()

    # --- loading ----------------------------------------------------------------------

    def load(self) -> None:
        """Discover and load every entry point of the group ``anomaly`` (once)."""
        if self._loaded:
            return
        self._loaded = True
        if not self._discover:
            return
        disabled = set(_env_list("ANOMALY_DISABLE_PLUGINS") or [])
        only = _env_list("ANOMALY_LOAD_PLUGINS")
        allowed = None if only is None else {_normalize(item) for item in only}
        for entry_point in sorted(
            importlib_metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name
        ):
            dist = entry_point.dist
            distribution = dist.name if dist is not None else "unknown"
            version = dist.version if dist is not None else "unknown"
            key = f"{distribution}:{entry_point.name}"
            if key in self._plugins:
                continue  # the same distribution seen twice on sys.path
            info = PluginInfo(distribution, version, entry_point.name)
            self._plugins[key] = info
            blocked_by = None
            if entry_point.name in disabled or distribution in disabled:
                blocked_by = "ANOMALY_DISABLE_PLUGINS"
            elif allowed is not None and _normalize(distribution) not in allowed:
                blocked_by = "ANOMALY_LOAD_PLUGINS"
            if blocked_by is not None:
                info.status = PluginStatus.BLOCKED
                info.reason = f"blocked by {blocked_by}"
                continue
            try:
                module = entry_point.load()
            except Exception as err:  # noqa: BLE001 - any import failure drops only this plugin
                self._fail(info, "import", err)
                continue
            self._register(module, info)

    def register(
        self, plugin: object, name: str, *, distribution: str | None = None, version: str = "0"
    ) -> PluginInfo:
        """Register an object or module of hook implementations by hand (tests, notebooks).

        Args:
            plugin: Module or object with ``@hookimpl`` functions.
            name: Entry point-like name, unique in this manager.
            distribution: Distribution to report as the provider; defaults to ``name``.
            version: Version to report.

        Returns:
            The plugin's record; its status says whether it loaded.
        """
        self.load()
        info = PluginInfo(distribution or name, version, name)
        self._plugins[f"{info.distribution}:{name}"] = info
        self._register(plugin, info)
        self._registries.clear()
        return info

    def _register(self, plugin: object, info: PluginInfo) -> None:
        try:
            self._pm.register(plugin, name=f"{info.distribution}:{info.entry_point}")
            info.hooks = sorted(
                impl_name
                for impl_name in dir(plugin)
                if impl_name.startswith("anomaly_") and impl_name in _HOOK_OF_KIND.values()
            )
            info.specs = self._collect(plugin)
        except Exception as err:  # noqa: BLE001 - a broken plugin must not break the rest
            if self._pm.is_registered(plugin):
                self._pm.unregister(plugin)
            info.specs = {}
            self._fail(info, "register", err)

    def _collect(self, plugin: object) -> dict[ComponentKind, list[Spec]]:
        specs: dict[ComponentKind, list[Spec]] = {}
        for kind, hook_name in _HOOK_OF_KIND.items():
            caller = getattr(self._pm.hook, hook_name)
            for impl in caller.get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                result = impl.function()
                if not isinstance(result, Sequence) or isinstance(result, str):
                    msg = f"{hook_name} returned {type(result).__name__}, expected a list of specs"
                    raise TypeError(msg)
                expected = _SPEC_OF_KIND[kind]
                for spec in result:
                    if not isinstance(spec, expected):
                        msg = f"{hook_name} returned {spec!r}, expected {expected.__name__}"
                        raise TypeError(msg)
                specs.setdefault(kind, []).extend(result)
        return specs

    def _fail(self, info: PluginInfo, step: str, err: BaseException) -> None:
        info.status = PluginStatus.BROKEN
        info.reason = f"{type(err).__name__}: {err}"
        message = (
            f"plugin {info.distribution!r} {info.version} (entry point {info.entry_point!r}) "
            f"failed to {step} and was skipped: {info.reason}; reinstall or upgrade it, or "
            f"block it with ANOMALY_DISABLE_PLUGINS={info.entry_point}"
        )
        if self.strict:
            raise PluginLoadError(message) from err
        warnings.warn(message, PluginLoadWarning, stacklevel=4)

    # --- queries ----------------------------------------------------------------------

    def plugins(self) -> list[PluginInfo]:
        """Return every plugin seen, loaded or not, with conflicts marked; never raises."""
        self.load()
        for kind in ComponentKind:
            self._specs_by_name(kind, mark_only=True)
        return sorted(self._plugins.values(), key=lambda info: info.distribution)

    def _specs_by_name(self, kind: ComponentKind, *, mark_only: bool = False) -> dict[str, Spec]:
        self.load()
        if not mark_only and kind in self._registries:
            return self._registries[kind]
        registry: dict[str, Spec] = {}
        owners: dict[str, PluginInfo] = {}
        for info in self._plugins.values():
            if info.status in (PluginStatus.BLOCKED, PluginStatus.BROKEN):
                continue
            for spec in info.specs.get(kind, []):
                if spec.name in registry:
                    first = owners[spec.name]
                    if mark_only:
                        for clashing in (first, info):
                            clashing.status = PluginStatus.CONFLICT
                            clashing.reason = (
                                f"{kind.value[:-1]} {spec.name!r} is also registered by "
                                f"{(info if clashing is first else first).distribution!r}"
                            )
                        continue
                    msg = (
                        f"{kind.value[:-1]} {spec.name!r} is registered by both "
                        f"{first.distribution!r} and {info.distribution!r}; uninstall one of "
                        f"them or block one with ANOMALY_DISABLE_PLUGINS"
                    )
                    raise RegistryConflictError(msg)
                registry[spec.name] = _with_provider(spec, info.distribution)
                owners[spec.name] = info
        if not mark_only:
            self._registries[kind] = registry
        return registry

    def specs(self, kind: ComponentKind | str) -> dict[str, Spec]:
        """Return the registry of one kind, name to spec.

        Raises:
            RegistryConflictError: When two distributions register the same name.
        """
        return dict(self._specs_by_name(ComponentKind(kind)))

    def get(self, kind: ComponentKind | str, name: str) -> Spec:
        """Return the spec registered as ``name`` for ``kind``.

        Raises:
            UnknownNameError: When no plugin registers that name; lists the names that exist.
        """
        kind = ComponentKind(kind)
        registry = self._specs_by_name(kind)
        if name in registry:
            return registry[name]
        label = kind.value[:-1]
        known = sorted(registry)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        msg = (
            f"unknown {label} {name!r}; {hint}known: {', '.join(known) or 'none'}. "
            f"Run 'anomaly plugins' to see what is installed, or pip install a plugin "
            f"that provides it"
        )
        raise UnknownNameError(msg)

    # --- typed lookups ----------------------------------------------------------------

    def _typed(self, kind: ComponentKind, name: str, spec_type: type[SpecT]) -> SpecT:
        return cast(SpecT, self.get(kind, name))

    def model(self, name: str) -> ModelSpec:
        """Return the model spec called ``name``."""
        return self._typed(ComponentKind.MODEL, name, ModelSpec)

    def datamodule(self, name: str) -> DataModuleSpec:
        """Return the datamodule spec called ``name``."""
        return self._typed(ComponentKind.DATAMODULE, name, DataModuleSpec)

    def metric(self, name: str) -> MetricSpec:
        """Return the metric spec called ``name``."""
        return self._typed(ComponentKind.METRIC, name, MetricSpec)

    def visualizer(self, name: str) -> VisualizerSpec:
        """Return the visualizer spec called ``name``."""
        return self._typed(ComponentKind.VISUALIZER, name, VisualizerSpec)

    def exporter(self, name: str) -> ExporterSpec:
        """Return the exporter spec called ``name``."""
        return self._typed(ComponentKind.EXPORTER, name, ExporterSpec)

    def inferencer(self, name: str) -> InferencerSpec:
        """Return the inferencer spec called ``name``."""
        return self._typed(ComponentKind.INFERENCER, name, InferencerSpec)

    def backbone(self, name: str) -> BackboneSpec | None:
        """Return the weight provider for timm model ``name``, or None when none exists."""
        spec = self._specs_by_name(ComponentKind.BACKBONE).get(name)
        return cast(BackboneSpec | None, spec)

    def commands(self) -> list[CommandSpec]:
        """Return every registered CLI command spec."""
        registry = self._specs_by_name(ComponentKind.COMMAND)
        return [cast(CommandSpec, spec) for spec in registry.values()]

    def names(self, kind: ComponentKind | str) -> list[str]:
        """Return the sorted registry names of one kind."""
        return sorted(self._specs_by_name(ComponentKind(kind)))


def _with_provider(spec: Spec, provider: str) -> Spec:
    if spec.provider == provider:
        return spec
    import dataclasses

    return dataclasses.replace(spec, provider=provider)


_MANAGER: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """Return the process-wide plugin manager, created on first call (discovery is lazy)."""
    global _MANAGER  # noqa: PLW0603 - one cached manager, resettable
    if _MANAGER is None:
        _MANAGER = PluginManager()
    return _MANAGER


def reset_plugin_manager() -> None:
    """Forget the cached plugin manager so the next call rediscovers plugins."""
    global _MANAGER  # noqa: PLW0603 - see get_plugin_manager
    _MANAGER = None


