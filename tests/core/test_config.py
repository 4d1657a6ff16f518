from __future__ import annotations

from pathlib import Path

import pytest

from anomaly import ConfigError
from anomaly._config import (
    apply_overrides,
    check_arguments,
    load_config_files,
    parse_overrides,
    resolve_config,
)


def test_defaults_train_patchcore_on_the_demo():
    config = resolve_config({})
    assert config.model.name == "patchcore"
    assert config.data.name == "demo"
    assert "aupro" in config.metrics
    assert config.export_formats == ("torch",)


def test_overrides_parse_yaml_values_and_dotted_keys():
    parsed = parse_overrides(
        [
            "--model",
            "padim",
            "--model.layers",
            "[4, 8]",
            "--data.root=imgs",
            "--seed",
            "3",
            "--engine.max_epochs",
            "2",
            "--visualizer",
            "null",
        ]
    )
    assert parsed == {
        "model": {"name": "padim", "layers": [4, 8]},
        "data": {"root": "imgs"},
        "seed": 3,
        "engine": {"max_epochs": 2},
        "visualizer": None,
    }


@pytest.mark.parametrize(
    ("args", "match"),
    [(["stray"], "unexpected argument"), (["--model.backbone"], "needs a value")],
)
def test_bad_overrides_raise(args, match):
    with pytest.raises(ConfigError, match=match):
        parse_overrides(args)


def test_command_line_beats_later_file_beats_earlier_file(tmp_path: Path):
    first = tmp_path / "a.yaml"
    second = tmp_path / "sub" / "b.yaml"
    second.parent.mkdir()
    first.write_text("model: {name: patchcore, coreset_ratio: 0.2}\nseed: 1\n")
    second.write_text("model: {coreset_ratio: 0.05}\ndata: {name: folder, root: imgs}\nseed: 2\n")
    data = load_config_files([first, second])
    data = apply_overrides(data, parse_overrides(["--seed", "7"]))
    config = resolve_config(data)
    assert config.model.init_args == {"coreset_ratio": 0.05}
    assert config.seed == 7
    # Paths are relative to the file that sets them.
    assert config.data.init_args["root"] == str(tmp_path / "sub" / "imgs")


def test_changing_a_component_name_drops_the_old_arguments(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {name: patchcore, coreset_ratio: 0.2}\n")
    data = apply_overrides(load_config_files([path]), parse_overrides(["--model", "padim"]))
    assert resolve_config(data).model.init_args == {}


def test_resolved_config_round_trips_through_yaml(tmp_path: Path):
    import yaml

    config = resolve_config(parse_overrides(["--model.coreset_ratio", "0.3", "--seed", "4"]))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    again = resolve_config(load_config_files([path]))
    assert again.to_dict()["model"] == config.to_dict()["model"]
    assert again.seed == 4


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"modle": {"name": "x"}}, "did you mean 'model'"),
        ({"seed": -1}, "seed"),
        ({"metrics": [1, 2]}, "metrics"),
        ({"export": {"format": ["torch"]}}, "did you mean 'formats'"),
        ({"model": "patchcore"}, "must be a mapping"),
        ({"visualizer": 3}, "visualizer"),
    ],
)
def test_bad_config_values_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config(data)


def test_config_file_errors_are_one_line(tmp_path: Path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_files([broken])
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config_files([tmp_path / "missing.yaml"])
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config_files([listing])


def test_check_arguments_suggests_the_closest_parameter():
    def build(backbone: str = "x", coreset_ratio: float = 0.1) -> None:
        return None

    check_arguments("model", build, {"backbone": "y"})
    with pytest.raises(ConfigError, match="did you mean 'coreset_ratio'"):
        check_arguments("model", build, {"coreset_rato": 0.2})

    def needs_root(root: str) -> None:
        return None

    with pytest.raises(ConfigError, match=r"'data.root' is required"):
        check_arguments("data", needs_root, {})
