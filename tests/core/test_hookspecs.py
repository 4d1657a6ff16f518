"""Meta-tests of the hook specifications and of every first-party registration.

- every hookspec in ``anomaly.hookspecs`` has a ``test_hook_<name>`` here, which registers an
  implementation on a fresh manager and checks it is called once and its specs recorded;
- every hookspec has a ``###`` heading with its exact signature in ``docs/plugins/hooks.md``;
- every spec registered by an installed first-party distribution imports, subclasses its
  base and, where its constructor needs no argument, builds.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import click
import importlib_metadata
import pytest

import anomaly
from anomaly import (
    BackboneSpec,
    CommandSpec,
    ComponentKind,
    DataModuleSpec,
    ExporterSpec,
    InferencerSpec,
    MetricSpec,
    ModelSpec,
    PluginManager,
    VisualizerSpec,
    hookimpl,
    hookspecs,
)
from anomaly._plugins import PluginInfo, PluginStatus
from anomaly._specs import Spec

HOOKS_DOC = Path(__file__).resolve().parents[2] / "docs" / "plugins" / "hooks.md"
FIRST_PARTY = (
    "anomaly-core",
    "anomaly-data",
    "anomaly-models-memory",
    "anomaly-models-flow",
    "anomaly-models-reconstruction",
    "anomaly-deploy",
)
PROVIDER = "anomaly-hook-test"


def _hookspecs() -> dict[str, Callable[..., object]]:
    """Every function ``anomaly.hookspecs`` marks as a hook specification."""
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    return {
        name: function
        for name, function in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(function, marker)
    }


def signature_text(function: Callable[..., object]) -> str:
    """``name(parameters) -> return`` with annotations as written in the source."""
    signature = inspect.signature(function)  # annotations stay strings: __future__ annotations
    parameters = []
    for parameter in signature.parameters.values():
        text = parameter.name
        if parameter.annotation is not inspect.Parameter.empty:
            text += f": {parameter.annotation}"
        if parameter.default is not inspect.Parameter.empty:
            text += f" = {parameter.default!r}"
        parameters.append(text)
    return f"{function.__name__}({', '.join(parameters)}) -> {signature.return_annotation}"


def _registered(plugin: object) -> PluginManager:
    """A fresh manager holding ``plugin`` alone; it must load cleanly."""
    pm = PluginManager(discover=False, strict=True)
    info = pm.register(plugin, "hook_test", distribution=PROVIDER, version="1.0")
    assert info.status is PluginStatus.OK
    return pm


# --- one test per hook -----------------------------------------------------------------


def test_hook_anomaly_register_models() -> None:
    class Plugin:
        calls = 0

        @hookimpl
        def anomaly_register_models(self) -> list[ModelSpec]:
            Plugin.calls += 1
            return [ModelSpec(name="hooked", family="test", target="anomaly:AnomalyModule")]

    pm = _registered(Plugin())

    spec = pm.model("hooked")
    assert Plugin.calls == 1
    assert (spec.provider, spec.family) == (PROVIDER, "test")
    assert pm.names(ComponentKind.MODEL) == ["hooked"]
    assert spec.load() is anomaly.AnomalyModule


def test_hook_anomaly_register_datamodules() -> None:
    class Plugin:
        calls = 0

        @hookimpl
        def anomaly_register_datamodules(self) -> list[DataModuleSpec]:
            Plugin.calls += 1
            return [DataModuleSpec(name="hooked", target="anomaly:AnomalyDataModule")]

    pm = _registered(Plugin())

    spec = pm.datamodule("hooked")
    assert Plugin.calls == 1
    assert spec.provider == PROVIDER
    assert pm.names(ComponentKind.DATAMODULE) == ["hooked"]


def test_hook_anomaly_register_backbones() -> None:
    class Plugin:
        calls = 0

        @hookimpl
        def anomaly_register_backbones(self) -> list[BackboneSpec]:
            Plugin.calls += 1
            return [BackboneSpec(name="resnet18", target="pathlib:Path.home")]

    pm = _registered(Plugin())

    spec = pm.backbone("resnet18")
    assert Plugin.calls == 1
    assert spec is not None
    assert spec.provider == PROVIDER
    assert callable(spec.load())
    assert pm.backbone("resnet50") is None


def test_hook_anomaly_register_metrics() -> None:
    class Plugin:
        calls = 0

        @hookimpl
        def anomaly_register_metrics(self) -> list[MetricSpec]:
            Plugin.calls += 1
            return [MetricSpec(name="hooked", target="a:B", level="pixel")]

    pm = _registered(Plugin())

    spec = pm.metric("hooked")
    assert Plugin.calls == 1
    assert (spec.provider, spec.level) == (PROVIDER, "pixel")


def test_hook_anomaly_register_visualizers() -> None:
    class Plugin:
        calls = 0

        @hookimpl
        def anomaly_register_visualizers(self) -> list[VisualizerSpec]:
            Plugin.calls += 1
            return [VisualizerSpec(name="hooked", target="a:B")]

    pm = _registered(Plugin())

    spec = pm.visualizer("hooked")
    assert Plugin.calls == 1
    assert spec.provider == PROVIDER


def test_hook_anomaly_register_exporters() -> None:
    class Plugin:
        calls = 0

        @hookimpl
        def anomaly_register_exporters(self) -> list[ExporterSpec]:
            Plugin.calls += 1
            return [ExporterSpec(name="hooked", target="a:export")]

    pm = _registered(Plugin())

    spec = pm.exporter("hooked")
    assert Plugin.calls == 1
    assert spec.provider == PROVIDER


def test_hook_anomaly_register_inferencers() -> None:
    class Plugin:
        calls = 0

        @hookimpl
        def anomaly_register_inferencers(self) -> list[InferencerSpec]:
            Plugin.calls += 1
            return [InferencerSpec(name="hooked", target="a:Inferencer")]

    pm = _registered(Plugin())

    spec = pm.inferencer("hooked")
    assert Plugin.calls == 1
    assert spec.provider == PROVIDER


@click.command()
def hooked_command() -> None:
    """Say hello."""
    click.echo("hello")


def test_hook_anomaly_register_commands() -> None:
    class Plugin:
        calls = 0

        @hookimpl
        def anomaly_register_commands(self) -> list[CommandSpec]:
            Plugin.calls += 1
            return [CommandSpec(name="hooked", target=f"{__name__}:hooked_command")]

    pm = _registered(Plugin())

    (spec,) = pm.commands()
    assert Plugin.calls == 1
    assert (spec.name, spec.provider) == ("hooked", PROVIDER)
    assert spec.load() is hooked_command


# --- meta-tests of the specifications --------------------------------------------------


def test_every_hookspec_has_a_test() -> None:
    missing = [name for name in _hookspecs() if not callable(globals().get(f"test_hook_{name}"))]

    assert _hookspecs(), "no hookspec found"
    assert missing == []


def test_every_test_hook_names_a_hookspec() -> None:
    tests = [name.removeprefix("test_hook_") for name in globals() if name.startswith("test_hook_")]

    assert sorted(tests) == sorted(_hookspecs())


def test_every_hookspec_has_a_heading_with_its_signature() -> None:
    headings = [
        line.removeprefix("### ").strip().strip("`")
        for line in HOOKS_DOC.read_text(encoding="utf-8").splitlines()
        if line.startswith("### ")
    ]
    documented = {heading for heading in headings if heading.startswith("anomaly_")}

    expected = {signature_text(function) for function in _hookspecs().values()}
    assert expected - documented == set(), "hooks missing from docs/plugins/hooks.md"
    assert documented - expected == set(), "docs/plugins/hooks.md documents hooks that differ"


@pytest.mark.parametrize("name", sorted(_hookspecs()))
def test_hookspec_follows_the_conventions(name: str) -> None:
    function = _hookspecs()[name]
    options = getattr(function, f"{hookspecs.PROJECT_NAME}_spec")

    assert re.fullmatch(r"anomaly_[a-z]+_[a-z_]+", name)
    assert function.__doc__
    summary = function.__doc__.splitlines()[0]
    assert summary.endswith(".")
    assert not options.get("historic")
    if name.startswith("anomaly_register_"):
        assert inspect.signature(function).parameters == {}
        assert not options.get("firstresult")
        kind = ComponentKind(name.removeprefix("anomaly_register_"))
        assert str(inspect.signature(function).return_annotation).startswith("Sequence[")
        assert kind.value in name


# --- every first-party spec ------------------------------------------------------------


def _installed(distribution: str) -> bool:
    try:
        importlib_metadata.distribution(distribution)
    except importlib_metadata.PackageNotFoundError:
        return False
    return True


def _first_party_params() -> list[Any]:
    """One param per first-party spec, or per first-party plugin that failed to load."""
    installed = [name for name in FIRST_PARTY if _installed(name)]
    environment = {"ANOMALY_LOAD_PLUGINS": ",".join(installed)}
    with mock.patch.dict(os.environ, environment):
        for variable in ("ANOMALY_DISABLE_PLUGINS", "ANOMALY_TRACE_PLUGINS"):
            os.environ.pop(variable, None)
        # Strict: failures are recorded, not warned, and plugins() never raises.
        infos = PluginManager(strict=True).plugins()
    params: list[Any] = []
    for info in infos:
        if info.distribution not in installed:
            continue
        if info.status is not PluginStatus.OK:
            params.append(pytest.param(info, id=f"{info.distribution}:{info.status.value}"))
            continue
        for kind in ComponentKind:
            for spec in info.specs.get(kind, []):
                params.append(pytest.param(spec, id=f"{kind.value}:{spec.name}"))
    return params


def _required_arguments(target: Callable[..., object]) -> list[str]:
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # some builtins have no signature; treat as buildable
        return []
    return [
        parameter.name
        for parameter in signature.parameters.values()
        if parameter.default is inspect.Parameter.empty
        and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    ]


def _bases() -> dict[ComponentKind, type]:
    from anomaly.metrics import AnomalyMetric
    from anomaly.visualizers import Visualizer

    return {
        ComponentKind.MODEL: anomaly.AnomalyModule,
        ComponentKind.DATAMODULE: anomaly.AnomalyDataModule,
        ComponentKind.METRIC: AnomalyMetric,
        ComponentKind.VISUALIZER: Visualizer,
    }


def test_first_party_plugins_register_something() -> None:
    providers = {
        value.provider if isinstance(value, Spec) else value.distribution
        for value in (param.values[0] for param in _first_party_params())
    }

    assert "anomaly-core" in providers
    assert len(providers) > 1


@pytest.mark.parametrize("spec", _first_party_params())
def test_first_party_spec_loads_subclasses_its_base_and_builds(
    spec: Spec | PluginInfo, tmp_path: Path
) -> None:
    if isinstance(spec, PluginInfo):
        pytest.fail(f"plugin {spec.distribution!r} is {spec.status.value}: {spec.reason}")
    assert spec.provider in FIRST_PARTY

    target = spec.load()

    bases = _bases()
    if spec.kind in bases:
        assert isinstance(target, type), f"{spec.target} is not a class"
        assert issubclass(target, bases[spec.kind]), f"{spec.target} is no {bases[spec.kind]}"
        # Arguments every component of a kind takes by contract; anything else is skipped.
        given = {"output_dir": tmp_path} if spec.kind is ComponentKind.VISUALIZER else {}
        required = [name for name in _required_arguments(target) if name not in given]
        if required:
            pytest.skip(f"{spec.target} needs {', '.join(required)}")
        assert isinstance(target(**given), bases[spec.kind])
    elif spec.kind is ComponentKind.INFERENCER:
        assert isinstance(target, type), f"{spec.target} is not a class"
    elif spec.kind is ComponentKind.COMMAND:
        assert isinstance(target, click.Command)
    else:  # exporters and backbone weight providers are callables
        assert callable(target), f"{spec.target} is not callable"
