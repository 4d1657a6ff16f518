"""Plugin loading, the registries, conflicts and broken plugins.

Every test builds its own ``PluginManager``; ``tests/conftest.py`` resets the global one and
turns strict loading on, so tests of the warning path pass ``strict=False``.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any, cast

import importlib_metadata
import pytest
import torch
from plugin_dist import EXAMPLE_ROOT, PluginSite, read_project

import anomaly
from anomaly import (
    AnomalyModule,
    Batch,
    CommandSpec,
    ComponentKind,
    DataModuleSpec,
    ModelSpec,
    PluginLoadError,
    PluginLoadWarning,
    PluginManager,
    RegistryConflictError,
    UnknownNameError,
    hookimpl,
)
from anomaly._plugins import PluginStatus

EXAMPLE = "anomaly-example-plugin"


def _info(pm: PluginManager, distribution: str):
    (info,) = [info for info in pm.plugins() if info.distribution == distribution]
    return info


class ModelsPlugin:
    """A plugin object registered by hand: ``@hookimpl`` methods on a class."""

    def __init__(self, *names: str) -> None:
        self.names = names
        self.calls = 0

    @hookimpl
    def anomaly_register_models(self) -> list[ModelSpec]:
        self.calls += 1
        return [
            ModelSpec(name=name, family="test", target="anomaly:AnomalyModule")
            for name in self.names
        ]


# --- loading through entry points ------------------------------------------------------


def test_example_plugin_loads_from_its_entry_point(example_plugin: PluginSite) -> None:
    pm = PluginManager(strict=True)

    spec = pm.model("example_distance")

    assert spec.provider == EXAMPLE
    assert spec.family == "example"
    assert spec.target == "anomaly_example_plugin.model:ExampleDistance"
    model_class = spec.load()
    assert isinstance(model_class, type)
    assert issubclass(model_class, AnomalyModule)
    (command,) = pm.commands()
    assert (command.name, command.provider) == ("example_info", EXAMPLE)
    info = _info(pm, EXAMPLE)
    assert (info.version, info.entry_point, info.status) == (
        "0.1.0",
        "anomaly_example_plugin",
        PluginStatus.OK,
    )
    assert info.hooks == ["anomaly_register_commands", "anomaly_register_models"]
    assert info.names(ComponentKind.MODEL) == ["example_distance"]


def test_fixture_installs_what_the_pyproject_declares(example_plugin: PluginSite) -> None:
    project = read_project(EXAMPLE_ROOT)
    dist = importlib_metadata.distribution(EXAMPLE)

    assert (project.name, project.version) == (EXAMPLE, "0.1.0")
    assert dist.version == project.version
    found = {ep.name: ep.value for ep in dist.entry_points.select(group="anomaly")}
    assert (
        found == project.entry_points == {"anomaly_example_plugin": "anomaly_example_plugin.plugin"}
    )


def test_loading_the_example_plugin_imports_no_model_code(
    example_plugin: PluginSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in [name for name in sys.modules if name.startswith("anomaly_example_plugin")]:
        monkeypatch.delitem(sys.modules, module)  # e.g. imported by doctest collection

    PluginManager(strict=True).names("models")

    assert "anomaly_example_plugin.plugin" in sys.modules
    assert "anomaly_example_plugin.model" not in sys.modules


def test_discovery_is_lazy_and_happens_once(example_plugin: PluginSite) -> None:
    pm = PluginManager(strict=True)
    assert pm._plugins == {}  # nothing discovered at construction

    first = pm.specs("models")
    second = pm.specs(ComponentKind.MODEL)

    assert first == second
    assert list(first) == ["example_distance"]


@pytest.mark.parametrize(
    "blocked", ["anomaly_example_plugin", "anomaly-example-plugin", "Anomaly_Example.Plugin"]
)
def test_disable_plugins_blocks_by_entry_point_or_distribution(
    example_plugin: PluginSite, monkeypatch: pytest.MonkeyPatch, blocked: str
) -> None:
    example_plugin.add_other()
    monkeypatch.delenv("ANOMALY_LOAD_PLUGINS")
    monkeypatch.setenv("ANOMALY_DISABLE_PLUGINS", f"nothing_here, {blocked}")
    monkeypatch.setenv("ANOMALY_STRICT_PLUGINS", "0")
    pm = PluginManager()

    with warnings.catch_warnings():
        # Unlisted first-party plugins load too; this test is about the two example ones.
        warnings.simplefilter("ignore", PluginLoadWarning)
        names = pm.names("models")

    assert "example_distance" not in names
    assert "example_other" in names
    info = _info(pm, EXAMPLE)
    assert info.status is PluginStatus.BLOCKED
    assert info.reason == "listed in ANOMALY_DISABLE_PLUGINS"
    assert info.specs == {}


def test_load_plugins_loads_only_the_listed_distributions(
    plugin_site: PluginSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin_site.add_example()
    plugin_site.add_other()
    monkeypatch.setenv("ANOMALY_LOAD_PLUGINS", "anomaly-example-other, anomaly-core")
    pm = PluginManager(strict=True)

    assert pm.names("models") == ["example_other"]
    assert "image_auroc" in pm.names("metrics")  # anomaly-core was listed
    assert _info(pm, EXAMPLE).status is PluginStatus.BLOCKED
    assert _info(pm, EXAMPLE).reason == "not listed in ANOMALY_LOAD_PLUGINS"
    assert _info(pm, "anomaly-example-other").status is PluginStatus.OK
    assert _info(pm, "anomaly-data").status is PluginStatus.BLOCKED


def test_load_plugins_empty_loads_none(
    example_plugin: PluginSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANOMALY_LOAD_PLUGINS", "")
    pm = PluginManager(strict=True)

    assert pm.names("models") == []
    assert pm.names("metrics") == []  # core's own entry point is a plugin like the others
    infos = pm.plugins()
    assert {info.distribution for info in infos} >= {"anomaly-core", EXAMPLE}
    assert all(info.status is PluginStatus.BLOCKED for info in infos)


def test_without_switches_every_installed_plugin_is_seen(
    example_plugin: PluginSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANOMALY_LOAD_PLUGINS")
    pm = PluginManager(strict=False)

    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", PluginLoadWarning
        )  # first-party plugins are not tested here
        infos = {info.distribution: info for info in pm.plugins()}

    assert infos[EXAMPLE].status is PluginStatus.OK
    assert infos["anomaly-core"].entry_point == "core"
    assert all(info.status is not PluginStatus.BLOCKED for info in infos.values())


def test_discover_false_gives_an_empty_manager(example_plugin: PluginSite) -> None:
    pm = PluginManager(discover=False, strict=True)

    assert pm.plugins() == []
    assert pm.names("models") == []


# --- broken plugins --------------------------------------------------------------------


def test_broken_import_warns_once_naming_the_plugin_and_the_rest_loads(
    plugin_site: PluginSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin_site.add_broken_import()
    plugin_site.add_other()
    monkeypatch.setenv("ANOMALY_LOAD_PLUGINS", f"{EXAMPLE},anomaly-example-other")
    pm = PluginManager(strict=False)

    with pytest.warns(PluginLoadWarning) as record:
        names = pm.names("models")

    assert names == ["example_other"]
    assert len(record) == 1
    message = str(record[0].message)
    for part in (
        "'anomaly-example-plugin' 0.1.0",
        "entry point 'anomaly_example_plugin'",
        "failed to import",
        "ModuleNotFoundError",
        "anomaly_example_native_library_that_is_not_installed",
        "ANOMALY_DISABLE_PLUGINS=anomaly_example_plugin",
    ):
        assert part in message
    assert "\n" not in message
    assert record[0].filename == __file__  # the warning points at the caller, not at anomaly
    info = _info(pm, EXAMPLE)
    assert info.status is PluginStatus.BROKEN
    assert info.reason.startswith("ModuleNotFoundError: ")
    assert pm.names("models") == ["example_other"]  # warned once, not on every lookup


def test_hook_that_raises_drops_the_whole_plugin(
    plugin_site: PluginSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin_site.add_broken_hook()
    monkeypatch.setenv("ANOMALY_LOAD_PLUGINS", EXAMPLE)
    pm = PluginManager(strict=False)

    with pytest.warns(
        PluginLoadWarning, match=r"'anomaly-example-plugin'.*RuntimeError: the command"
    ):
        models = pm.names("models")

    # Its models hook worked, but a plugin is dropped whole: none of its specs survive.
    assert models == []
    assert pm.commands() == []
    info = _info(pm, EXAMPLE)
    assert (info.status, info.specs, info.hooks) == (PluginStatus.BROKEN, {}, [])


def test_strict_mode_raises_plugin_load_error_on_lookup(
    plugin_site: PluginSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin_site.add_broken_import()
    plugin_site.add_other()
    monkeypatch.setenv("ANOMALY_LOAD_PLUGINS", f"{EXAMPLE},anomaly-example-other")
    monkeypatch.setenv("ANOMALY_STRICT_PLUGINS", "1")
    pm = PluginManager()
    assert pm.strict

    with pytest.raises(PluginLoadError, match=r"'anomaly-example-plugin' 0\.1\.0") as excinfo:
        pm.model("example_other")

    assert isinstance(excinfo.value.__cause__, ModuleNotFoundError)
    with pytest.raises(PluginLoadError):
        pm.load()  # every lookup raises again, none half-works
    # Listing never raises: it is how the user finds the broken plugin.
    assert _info(pm, EXAMPLE).status is PluginStatus.BROKEN


def test_strict_false_overrides_the_environment(
    plugin_site: PluginSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin_site.add_broken_import()
    monkeypatch.setenv("ANOMALY_LOAD_PLUGINS", EXAMPLE)
    monkeypatch.setenv("ANOMALY_STRICT_PLUGINS", "1")

    with pytest.warns(PluginLoadWarning):
        assert PluginManager(strict=False).names("models") == []


class _Both:
    """Registers a command fine and a model badly: nothing of it may survive."""

    def __init__(self, models: object) -> None:
        self.models = models

    @hookimpl
    def anomaly_register_commands(self) -> list[CommandSpec]:
        return [CommandSpec(name="both_command", target="click:Command")]

    @hookimpl
    def anomaly_register_models(self) -> object:
        return self.models


@pytest.mark.parametrize(
    ("returned", "match"),
    [
        ("example_distance", "returned str, expected a list of ModelSpec"),
        (None, "returned NoneType, expected a list of ModelSpec"),
        (ModelSpec(name="single", target="a:b"), "returned ModelSpec, expected a list"),
        ([DataModuleSpec(name="folder", target="a:b")], "expected ModelSpec"),
        ([ModelSpec(name="twice", target="a:b")] * 2, "returned the name 'twice' twice"),
    ],
    ids=["str", "none", "bare-spec", "wrong-kind", "duplicate"],
)
def test_hook_returning_a_wrong_type_drops_the_plugin_whole(returned: object, match: str) -> None:
    pm = PluginManager(discover=False, strict=False)

    with pytest.warns(PluginLoadWarning, match=match) as record:
        info = pm.register(_Both(returned), "both", distribution="anomaly-both", version="1.2")

    assert len(record) == 1
    assert "'anomaly-both' 1.2" in str(record[0].message)
    assert info.status is PluginStatus.BROKEN
    assert pm.commands() == []
    assert pm.names("models") == []


def test_strict_register_by_hand_raises() -> None:
    pm = PluginManager(discover=False, strict=True)

    with pytest.raises(PluginLoadError, match="returned NoneType") as excinfo:
        pm.register(_Both(None), "both")

    assert isinstance(excinfo.value.__cause__, TypeError)


@pytest.mark.parametrize("name", ["Patchcore", "bad-name", "1st", "", "a b", "_private", "é"])
def test_bad_registry_names_are_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="must match"):
        ModelSpec(name=name, target="a:b")


def test_plugin_registering_a_bad_name_is_dropped() -> None:
    class BadName:
        @hookimpl
        def anomaly_register_models(self) -> list[ModelSpec]:
            return [ModelSpec(name="Bad-Name", target="a:b")]

    pm = PluginManager(discover=False, strict=False)

    with pytest.warns(PluginLoadWarning, match=r"ValueError: registry name 'Bad-Name' must match"):
        info = pm.register(BadName(), "bad_name")

    assert info.status is PluginStatus.BROKEN
    assert pm.names("models") == []


def test_target_must_name_module_and_attribute() -> None:
    with pytest.raises(ValueError, match="'module:attribute'"):
        ModelSpec(name="fine", target="no_colon_here")


def test_misspelled_hook_is_reported_with_the_closest_match() -> None:
    class Typo:
        @hookimpl
        def anomaly_register_modles(self) -> list[ModelSpec]:
            return []

    pm = PluginManager(discover=False, strict=False)

    with pytest.warns(PluginLoadWarning, match="did you mean 'anomaly_register_models'"):
        assert pm.register(Typo(), "typo").status is PluginStatus.BROKEN


def test_hook_without_hookimpl_marker_is_reported() -> None:
    class Unmarked:
        def anomaly_register_models(self) -> list[ModelSpec]:
            return [ModelSpec(name="unmarked", target="a:b")]

    pm = PluginManager(discover=False, strict=False)

    with pytest.warns(PluginLoadWarning, match="not marked with @anomaly.hookimpl"):
        pm.register(Unmarked(), "unmarked")

    assert pm.names("models") == []


def test_hook_with_unknown_arguments_is_reported() -> None:
    class ExtraArgument:
        @hookimpl
        def anomaly_register_models(self, config: object) -> list[ModelSpec]:
            return []

    pm = PluginManager(discover=False, strict=False)

    with pytest.warns(PluginLoadWarning, match="PluginValidationError"):
        info = pm.register(ExtraArgument(), "extra")

    assert info.status is PluginStatus.BROKEN


def test_wrapper_hooks_are_rejected() -> None:
    class Wrapper:
        @hookimpl(wrapper=True)
        def anomaly_register_models(self) -> object:
            return (yield)

    pm = PluginManager(discover=False, strict=False)

    with pytest.warns(PluginLoadWarning, match="not a wrapper"):
        pm.register(Wrapper(), "wrapper")


# --- registering by hand ---------------------------------------------------------------


def test_plugin_registered_by_hand_with_hookimpl_methods() -> None:
    pm = PluginManager(discover=False, strict=True)
    plugin = ModelsPlugin("alpha", "beta")

    info = pm.register(plugin, "by_hand")

    assert (info.distribution, info.entry_point, info.status) == (
        "by_hand",
        "by_hand",
        PluginStatus.OK,
    )
    assert pm.names("models") == ["alpha", "beta"]
    assert pm.model("beta").provider == "by_hand"
    assert plugin.calls == 1  # each hook is called once per manager, not per lookup
    pm.model("alpha")
    assert plugin.calls == 1


def test_register_records_the_given_distribution_as_provider() -> None:
    pm = PluginManager(discover=False, strict=True)

    pm.register(ModelsPlugin("alpha"), "hand", distribution="my-plugin", version="2.0")

    assert pm.model("alpha").provider == "my-plugin"
    assert _info(pm, "my-plugin").version == "2.0"


def test_provider_set_by_the_plugin_is_overwritten() -> None:
    class Impostor:
        @hookimpl
        def anomaly_register_models(self) -> list[ModelSpec]:
            return [ModelSpec(name="alpha", target="a:b", provider="anomaly-core")]

    pm = PluginManager(discover=False, strict=True)
    pm.register(Impostor(), "impostor")

    assert pm.model("alpha").provider == "impostor"


def test_register_after_a_lookup_refreshes_the_registry() -> None:
    pm = PluginManager(discover=False, strict=True)
    pm.register(ModelsPlugin("alpha"), "first")
    assert pm.names("models") == ["alpha"]

    pm.register(ModelsPlugin("beta"), "second")

    assert pm.names("models") == ["alpha", "beta"]


def test_register_the_same_name_twice_is_refused_and_keeps_the_first() -> None:
    pm = PluginManager(discover=False, strict=True)
    pm.register(ModelsPlugin("alpha"), "same")

    with pytest.raises(RegistryConflictError, match="'same:same' is already registered"):
        pm.register(ModelsPlugin("beta"), "same")

    assert pm.names("models") == ["alpha"]
    assert _info(pm, "same").status is PluginStatus.OK


def test_register_by_hand_comes_after_discovered_plugins(example_plugin: PluginSite) -> None:
    pm = PluginManager(strict=True)

    pm.register(ModelsPlugin("alpha"), "by_hand")

    assert pm.names("models") == ["alpha", "example_distance"]


# --- lookups ---------------------------------------------------------------------------


def test_unknown_name_lists_what_exists_and_the_closest_match() -> None:
    pm = PluginManager(discover=False, strict=True)
    pm.register(ModelsPlugin("example_distance", "patchcore"), "models")

    with pytest.raises(UnknownNameError) as excinfo:
        pm.model("example_distanse")

    message = str(excinfo.value)
    assert "unknown model 'example_distanse'" in message
    assert "did you mean 'example_distance'?" in message
    assert "known: example_distance, patchcore" in message
    assert "anomaly plugins" in message
    assert "pip install" in message
    assert isinstance(excinfo.value, LookupError)


def test_unknown_name_in_an_empty_registry() -> None:
    pm = PluginManager(discover=False, strict=True)

    with pytest.raises(UnknownNameError, match="known: none"):
        pm.exporter("onnx")


def test_kinds_accept_singular_and_plural_names() -> None:
    pm = PluginManager(discover=False, strict=True)
    pm.register(ModelsPlugin("alpha"), "models")

    assert pm.get("model", "alpha") == pm.get("models", "alpha") == pm.model("alpha")
    with pytest.raises(UnknownNameError, match="unknown component kind 'modle'"):
        pm.names("modle")


def test_backbone_lookup_returns_none_when_unregistered() -> None:
    pm = PluginManager(discover=False, strict=True)

    assert pm.backbone("resnet18") is None


def test_trace_logs_every_hook_call(
    example_plugin: PluginSite, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ANOMALY_TRACE_PLUGINS", "1")

    with caplog.at_level(logging.INFO, logger="anomaly"):
        PluginManager(strict=True).load()

    assert "anomaly_register_models returned ['example_distance']" in caplog.text
    assert "anomaly_register_commands returned ['example_info']" in caplog.text


# --- conflicts -------------------------------------------------------------------------


def test_duplicate_name_raises_naming_both_distributions(
    example_plugin: PluginSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    example_plugin.add_twin()
    monkeypatch.setenv("ANOMALY_LOAD_PLUGINS", f"{EXAMPLE},anomaly-example-twin")
    pm = PluginManager(strict=True)

    with pytest.raises(RegistryConflictError) as excinfo:
        pm.model("example_distance")

    message = str(excinfo.value)
    assert "model 'example_distance' is registered by both" in message
    assert "'anomaly-example-plugin'" in message
    assert "'anomaly-example-twin'" in message
    assert "ANOMALY_DISABLE_PLUGINS=" in message
    with pytest.raises(RegistryConflictError):
        pm.names("models")  # the whole kind is unusable, not just the name
    assert [spec.name for spec in pm.commands()] == ["example_info"]  # other kinds work


def test_conflict_is_shown_by_plugins_without_raising(
    example_plugin: PluginSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    example_plugin.add_twin()
    monkeypatch.setenv("ANOMALY_LOAD_PLUGINS", f"{EXAMPLE},anomaly-example-twin")
    pm = PluginManager(strict=True)

    infos = {info.distribution: info for info in pm.plugins()}

    assert infos[EXAMPLE].status is PluginStatus.CONFLICT
    assert infos[EXAMPLE].reason == (
        "model 'example_distance' is also registered by 'anomaly-example-twin'"
    )
    assert infos["anomaly-example-twin"].status is PluginStatus.CONFLICT
    assert "'anomaly-example-plugin'" in infos["anomaly-example-twin"].reason


def test_blocking_one_side_resolves_a_conflict(
    example_plugin: PluginSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    example_plugin.add_twin()
    monkeypatch.setenv("ANOMALY_LOAD_PLUGINS", f"{EXAMPLE},anomaly-example-twin")
    monkeypatch.setenv("ANOMALY_DISABLE_PLUGINS", "anomaly_example_twin")
    pm = PluginManager(strict=True)

    assert pm.model("example_distance").provider == EXAMPLE
    assert _info(pm, EXAMPLE).status is PluginStatus.OK


# --- the global manager ----------------------------------------------------------------


def test_global_manager_is_cached_until_reset(example_plugin: PluginSite) -> None:
    first = anomaly.get_plugin_manager()
    assert anomaly.get_plugin_manager() is first
    assert first.names("models") == ["example_distance"]

    anomaly.reset_plugin_manager()

    assert anomaly.get_plugin_manager() is not first


# --- the example plugin's model --------------------------------------------------------


def _images(generator: torch.Generator, count: int, *, defect: bool = False) -> torch.Tensor:
    """(count, 3, 32, 32) horizontal ramps with a little noise; a defect flips a square."""
    ramp = torch.linspace(0.1, 0.9, 32).view(1, 1, 1, 32).expand(count, 3, 32, 32)
    images = (ramp + 0.02 * torch.randn(count, 3, 32, 32, generator=generator)).clamp(0, 1)
    if defect:
        images[:, :, 12:18, 20:26] = 1.0 - images[:, :, 12:18, 20:26]
    return images


def test_example_model_fits_in_one_pass_and_localizes_a_defect(
    example_plugin: PluginSite,
) -> None:
    model_class = PluginManager(strict=True).model("example_distance").load()
    assert isinstance(model_class, type)
    model = model_class(sigma=1.0)
    generator = torch.Generator().manual_seed(0)

    for index in range(3):
        assert model.training_step(Batch(image=_images(generator, 8)), index) is None
    model.fit_end()
    good_score, good_map = model(_images(generator, 4))
    bad_score, bad_map = model(_images(generator, 4, defect=True))

    assert good_map.shape == bad_map.shape == (4, 32, 32)
    assert bad_score.min() > 3 * good_score.max()
    peak = bad_map[0].argmax()
    assert 12 <= peak // 32 < 18
    assert 20 <= peak % 32 < 26
    assert dict(model.hparams) == {"sigma": 1.0, "min_std": 0.02}


def test_example_model_state_survives_a_checkpoint(example_plugin: PluginSite) -> None:
    from anomaly_example_plugin.model import ExampleDistance

    generator = torch.Generator().manual_seed(1)
    model = ExampleDistance()
    model.training_step(Batch(image=_images(generator, 8)), 0)
    model.fit_end()
    images = _images(generator, 2, defect=True)

    restored = ExampleDistance(**model.hparams)
    restored.load_state_dict(model.state_dict())

    torch.testing.assert_close(restored(images), model(images))
    assert "model.kernel" not in model.state_dict()


def test_example_model_refuses_to_score_before_fitting(example_plugin: PluginSite) -> None:
    from anomaly_example_plugin.model import ExampleDistance

    with pytest.raises(RuntimeError, match="not fitted"):
        ExampleDistance()(torch.rand(1, 3, 8, 8))
    with pytest.raises(anomaly.DataError, match="saw no training images"):
        ExampleDistance().fit_end()


def test_example_model_trains_with_lightning(example_plugin: PluginSite, tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from anomaly._batch import collate

    generator = torch.Generator().manual_seed(2)

    def items(count: int, *, defect: bool) -> Any:  # a list serves as a map-style dataset
        mask = torch.zeros(32, 32, dtype=torch.bool)
        if defect:
            mask[12:18, 20:26] = True
        return [
            {"image": image, "gt_label": int(defect), "gt_mask": mask, "image_path": ""}
            for image in _images(generator, count, defect=defect)
        ]

    train: DataLoader[Any] = DataLoader(items(16, defect=False), batch_size=8, collate_fn=collate)
    val: DataLoader[Any] = DataLoader(
        items(4, defect=False) + items(4, defect=True), batch_size=8, collate_fn=collate
    )
    spec = PluginManager(strict=True).model("example_distance")
    model_class = spec.load()
    assert isinstance(model_class, type)
    model = model_class()
    trainer = pl.Trainer(
        **model.trainer_arguments,
        accelerator="cpu",
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )

    trainer.fit(model, train, val)
    (predicted,) = cast(list[Batch], trainer.predict(model, val))
    assert predicted.pred_label is not None
    assert predicted.pred_mask is not None

    assert predicted.pred_label.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert predicted.pred_mask[4:, 12:18, 20:26].float().mean() > 0.5
