"""Plugin discovery, guarded loading and the per-kind registries."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import logging
import os
import sys
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
_KIND_OF_HOOK = {hook: kind for kind, hook in _HOOK_OF_KIND.items()}
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
        reason: Why the plugin is not ``ok``; empty when it is.
        hooks: Names of the hooks it implements.
        specs: What it registered, per kind; every spec's ``provider`` is ``distribution``.
    """

    distribution: str
    version: str
    entry_point: str
    status: PluginStatus = PluginStatus.OK
    reason: str = ""
    hooks: list[str] = field(default_factory=list)
    specs: dict[ComponentKind, list[Spec]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Return ``distribution:entry_point``, unique within one manager."""
        return f"{self.distribution}:{self.entry_point}"

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


def _normalize(name: str) -> str:
    """Normalize a distribution or entry point name (PEP 503), so ``a_b`` matches ``A-b``."""
    return name.lower().replace("_", "-").replace(".", "-")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _kind(kind: ComponentKind | str) -> ComponentKind:
    """Accept ``ComponentKind``, its value (``"models"``) or the singular (``"model"``)."""
    if isinstance(kind, ComponentKind):
        return kind
    for member in ComponentKind:
        if kind in (member.value, member.value[:-1]):
            return member
    choices = ", ".join(member.value for member in ComponentKind)
    msg = f"unknown component kind {kind!r}; use one of: {choices}"
    raise UnknownNameError(msg)


class PluginManager:
    """Find plugins through entry points, load each in a guarded step and keep the registries.

    Discovery happens on first use, never at construction. Each plugin is imported, validated
    and asked for its specs in its own guarded step: a failure drops that whole plugin (none of
    its specs survive) and emits one ``PluginLoadWarning``. In strict mode the first lookup
    raises ``PluginLoadError`` instead; ``plugins()`` never raises, so the failure can be shown.

    Args:
        strict: Raise instead of warning when a plugin cannot be loaded; defaults to the
            environment variable ``ANOMALY_STRICT_PLUGINS``.
        discover: Load the entry points of the group ``anomaly``; ``False`` gives an empty
            manager for plugins registered by hand (tests, notebooks).
    """

    def __init__(self, *, strict: bool | None = None, discover: bool = True) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self.strict = _env_flag("ANOMALY_STRICT_PLUGINS") if strict is None else strict
        self._discover = discover
        self._trace = _env_flag("ANOMALY_TRACE_PLUGINS")
        self._loaded = False
        self._plugins: dict[str, PluginInfo] = {}
        # key -> (warning text, cause), kept so strict mode can raise on the next lookup.
        self._failures: dict[str, tuple[str, BaseException]] = {}
        self._registries: dict[ComponentKind, dict[str, Spec]] = {}

    # --- loading ----------------------------------------------------------------------

    def load(self) -> None:
        """Discover and load every entry point of the group ``anomaly`` (once).

        Raises:
            PluginLoadError: In strict mode, when a plugin failed to import or register.
        """
        self._discover_all()
        self._raise_if_strict()

    def _discover_all(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if not self._discover:
            return
        disabled = {_normalize(item) for item in _env_list("ANOMALY_DISABLE_PLUGINS") or []}
        only = _env_list("ANOMALY_LOAD_PLUGINS")
        allowed = None if only is None else {_normalize(item) for item in only}
        found = importlib_metadata.entry_points(group=ENTRY_POINT_GROUP)
        for entry_point in sorted(found, key=lambda ep: (_dist_name(ep), ep.name)):
            dist = entry_point.dist
            info = PluginInfo(
                distribution=_dist_name(entry_point),
                version=dist.version if dist is not None else "unknown",
                entry_point=entry_point.name,
            )
            if info.key in self._plugins:
                continue  # the same distribution found twice on sys.path: the first wins
            self._plugins[info.key] = info
            names = {_normalize(info.distribution), _normalize(info.entry_point)}
            if names & disabled:
                info.status = PluginStatus.BLOCKED
                info.reason = "listed in ANOMALY_DISABLE_PLUGINS"
                continue
            if allowed is not None and not names & allowed:
                info.status = PluginStatus.BLOCKED
                info.reason = "not listed in ANOMALY_LOAD_PLUGINS"
                continue
            try:
                module = entry_point.load()
            except Exception as err:  # any import failure drops only this plugin
                self._fail(info, "import", err)
                continue
            self._register(module, info)
            logger.debug("loaded plugin %s %s (%s)", info.distribution, info.version, info.status)

    def register(
        self, plugin: object, name: str, *, distribution: str | None = None, version: str = "0"
    ) -> PluginInfo:
        """Register an object or module of hook implementations by hand (tests, notebooks).

        Discovery runs first, so plugins registered by hand come after the installed ones.

        Args:
            plugin: Module or object with ``@hookimpl`` functions or methods.
            name: Entry point-like name, unique per distribution in this manager.
            distribution: Distribution to report as the provider; defaults to ``name``.
            version: Version to report.

        Returns:
            The plugin's record; its status says whether it loaded.

        Raises:
            RegistryConflictError: When a plugin of that distribution and name exists.
            PluginLoadError: In strict mode, when the plugin fails to register.
        """
        self._discover_all()
        info = PluginInfo(distribution=distribution or name, version=version, entry_point=name)
        if info.key in self._plugins:
            msg = f"a plugin named {info.key!r} is already registered; register under another name"
            raise RegistryConflictError(msg)
        self._plugins[info.key] = info
        self._registries.clear()
        self._register(plugin, info)
        if info.key in self._failures:
            self._raise_if_strict(only=info.key)
        return info

    def _register(self, plugin: object, info: PluginInfo) -> None:
        try:
            self._pm.register(plugin, name=info.key)
        except Exception as err:  # e.g. a bad hook signature: drop the plugin
            self._fail(info, "register", err)
            return
        try:
            callers = self._pm.get_hookcallers(plugin) or []
            self._validate(plugin, callers)
            info.hooks = sorted(caller.name for caller in callers)
            info.specs = self._collect(plugin, callers, info)
        except Exception as err:  # a broken plugin must not break the rest
            self._pm.unregister(plugin)
            info.hooks = []
            info.specs = {}
            self._fail(info, "register", err)

    def _validate(self, plugin: object, callers: Sequence[pluggy.HookCaller]) -> None:
        implemented = {caller.name for caller in callers}
        known = sorted(_KIND_OF_HOOK)
        for caller in callers:
            if caller.spec is None:
                close = difflib.get_close_matches(caller.name, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
                msg = f"{caller.name!r} is not an anomaly hook; {hint}"
                raise TypeError(msg)
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and (impl.hookwrapper or impl.wrapper):
                    msg = f"{caller.name!r} must be a plain hook implementation, not a wrapper"
                    raise TypeError(msg)
        for hook_name in known:
            attribute = getattr(plugin, hook_name, None)
            if (
                callable(attribute)
                and hook_name not in implemented
                and attribute is not getattr(hookspecs, hook_name)
            ):
                msg = f"{hook_name!r} is not marked with @anomaly.hookimpl"
                raise TypeError(msg)

    def _collect(
        self, plugin: object, callers: Sequence[pluggy.HookCaller], info: PluginInfo
    ) -> dict[ComponentKind, list[Spec]]:
        specs: dict[ComponentKind, list[Spec]] = {}
        for caller in callers:
            kind = _KIND_OF_HOOK.get(caller.name)
            if kind is None:
                continue
            expected = _SPEC_OF_KIND[kind]
            # Call this plugin's implementation alone, so every spec knows its provider and
            # one plugin's failure cannot hide another's results.
            for impl in caller.get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                result = impl.function()
                if not isinstance(result, Sequence) or isinstance(result, str):
                    msg = (
                        f"{caller.name} returned {type(result).__name__}, "
                        f"expected a list of {expected.__name__}"
                    )
                    raise TypeError(msg)
                seen = {spec.name for spec in specs.get(kind, [])}
                for spec in result:
                    if not isinstance(spec, expected):
                        msg = f"{caller.name} returned {spec!r}, expected {expected.__name__}"
                        raise TypeError(msg)
                    if spec.name in seen:
                        msg = f"{caller.name} returned the name {spec.name!r} twice"
                        raise ValueError(msg)
                    seen.add(spec.name)
                    specs.setdefault(kind, []).append(_with_provider(spec, info.distribution))
                if self._trace:
                    logger.info(
                        "%s: %s returned %s",
                        info.key,
                        caller.name,
                        [spec.name for spec in result] or "nothing",
                    )
        return specs

    def _fail(self, info: PluginInfo, step: str, err: BaseException) -> None:
        info.status = PluginStatus.BROKEN
        info.reason = _one_line(err)
        message = (
            f"plugin {info.distribution!r} {info.version} (entry point {info.entry_point!r}) "
            f"failed to {step} and was skipped: {info.reason}; reinstall or upgrade it, or "
            f"block it with ANOMALY_DISABLE_PLUGINS={info.entry_point}"
        )
        self._failures[info.key] = (message, err)
        if not self.strict:
            warnings.warn(message, PluginLoadWarning, stacklevel=_outside_stacklevel())

    def _raise_if_strict(self, only: str | None = None) -> None:
        if not self.strict or not self._failures:
            return
        keys = [only] if only is not None else list(self._failures)
        message, cause = self._failures[keys[0]]
        if len(keys) > 1:
            message = f"{message} ({len(keys) - 1} more plugins failed; see 'anomaly plugins')"
        raise PluginLoadError(message) from cause

    # --- queries ----------------------------------------------------------------------

    def plugins(self) -> list[PluginInfo]:
        """Return every plugin seen, loaded or not, with conflicts marked; never raises."""
        self._discover_all()
        self._mark_conflicts()
        return sorted(self._plugins.values(), key=lambda info: (info.distribution, info.key))

    def _active(self) -> list[PluginInfo]:
        return [
            info
            for info in self._plugins.values()
            if info.status not in (PluginStatus.BLOCKED, PluginStatus.BROKEN)
        ]

    def _mark_conflicts(self) -> None:
        active = self._active()
        reasons: dict[str, list[str]] = {info.key: [] for info in active}
        for kind in ComponentKind:
            owners: dict[str, PluginInfo] = {}
            for info in active:
                for name in info.names(kind):
                    first = owners.setdefault(name, info)
                    if first is info:
                        continue
                    label = f"{kind.value[:-1]} {name!r}"
                    reasons[first.key].append(
                        f"{label} is also registered by {info.distribution!r}"
                    )
                    reasons[info.key].append(
                        f"{label} is also registered by {first.distribution!r}"
                    )
        for info in active:
            conflicts = reasons[info.key]
            info.status = PluginStatus.CONFLICT if conflicts else PluginStatus.OK
            info.reason = "; ".join(conflicts)

    def _registry(self, kind: ComponentKind) -> dict[str, Spec]:
        self.load()
        if kind in self._registries:
            return self._registries[kind]
        registry: dict[str, Spec] = {}
        owners: dict[str, PluginInfo] = {}
        for info in self._active():
            for spec in info.specs.get(kind, []):
                first = owners.setdefault(spec.name, info)
                if first is not info:
                    msg = (
                        f"{kind.value[:-1]} {spec.name!r} is registered by both "
                        f"{first.distribution!r} and {info.distribution!r}; uninstall one of "
                        f"them or block one with ANOMALY_DISABLE_PLUGINS={info.entry_point}"
                    )
                    raise RegistryConflictError(msg)
                registry[spec.name] = spec
        self._registries[kind] = registry
        return registry

    def specs(self, kind: ComponentKind | str) -> dict[str, Spec]:
        """Return the registry of one kind, name to spec, sorted by name.

        Raises:
            RegistryConflictError: When two distributions register the same name.
        """
        registry = self._registry(_kind(kind))
        return {name: registry[name] for name in sorted(registry)}

    def get(self, kind: ComponentKind | str, name: str) -> Spec:
        """Return the spec registered as ``name`` for ``kind``.

        Raises:
            UnknownNameError: When no plugin registers that name; lists the names that exist
                and the closest match.
            RegistryConflictError: When two distributions register the same name of ``kind``.
        """
        kind = _kind(kind)
        registry = self._registry(kind)
        if name in registry:
            return registry[name]
        known = sorted(registry)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        msg = (
            f"unknown {kind.value[:-1]} {name!r}; {hint}known: {', '.join(known) or 'none'}. "
            f"Run 'anomaly plugins' to see what is installed, or pip install a plugin "
            f"that provides it"
        )
        raise UnknownNameError(msg)

    # --- typed lookups ----------------------------------------------------------------

    def _typed(self, kind: ComponentKind, name: str, spec_type: type[SpecT]) -> SpecT:
        spec = self.get(kind, name)
        if not isinstance(spec, spec_type):  # _collect checked it; this keeps mypy honest
            msg = f"{kind.value[:-1]} {name!r} is a {type(spec).__name__}"
            raise TypeError(msg)
        return spec

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
        spec = self._registry(ComponentKind.BACKBONE).get(name)
        return cast(BackboneSpec | None, spec)

    def commands(self) -> list[CommandSpec]:
        """Return every registered CLI command spec, sorted by name."""
        registry = self._registry(ComponentKind.COMMAND)
        return [cast(CommandSpec, registry[name]) for name in sorted(registry)]

    def names(self, kind: ComponentKind | str) -> list[str]:
        """Return the sorted registry names of one kind."""
        return sorted(self._registry(_kind(kind)))


def _outside_stacklevel() -> int:
    """Return the ``stacklevel`` that makes a warning point at the first caller outside anomaly."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    # Level 1 is the frame that called warnings.warn: the caller of this helper.
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
        frame = frame.f_back
        level += 1
    return level


def _dist_name(entry_point: importlib_metadata.EntryPoint) -> str:
    dist = entry_point.dist
    return dist.name if dist is not None else "unknown"


def _with_provider(spec: Spec, provider: str) -> Spec:
    if spec.provider == provider:
        return spec
    return dataclasses.replace(spec, provider=provider)


_MANAGER: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """Return the process-wide plugin manager, created on first call (discovery is lazy)."""
    global _MANAGER  # one cached manager, resettable
    if _MANAGER is None:
        _MANAGER = PluginManager()
    return _MANAGER


def reset_plugin_manager() -> None:
    """Forget the cached plugin manager so the next call rediscovers plugins."""
    global _MANAGER  # see get_plugin_manager
    _MANAGER = None
