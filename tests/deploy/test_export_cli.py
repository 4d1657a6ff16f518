"""``anomaly export`` and the ``export`` section of ``anomaly run`` with the deploy exporters."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from anomaly import ConfigError, Engine, get_plugin_manager
from anomaly._cli import main
from anomaly._cli.run import _export_options
from anomaly._config import resolve_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _export_fixtures as fx  # found through the sys.path entry just above


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fitted PaDiM (shallow backbone, quick to export) saved as a checkpoint."""
    root = tmp_path_factory.mktemp("cli_data")
    model = fx.fit("padim", fx.datamodule(fx.make_data(root)), **fx.SHALLOW["padim"])
    return Engine().save_checkpoint(model, root / "model.ckpt")


def test_export_writes_an_onnx_folder(checkpoint, tmp_path, capsys):
    out = tmp_path / "onnx"
    code = main(["export", "--ckpt", str(checkpoint), "--format", "onnx", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Exported (onnx)" in captured.out
    assert sorted(path.name for path in out.iterdir()) == ["metadata.json", "model.onnx"]
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["model"] == "padim"
    assert metadata["precision"] == "fp32"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--format", "torch", "--precision", "fp16"], "use --format openvino"),
        (["--format", "openvino", "--precision", "fp8"], "unknown precision 'fp8'"),
        (["--format", "openvino", "--precision", "int8"], "--calibration FOLDER"),
        (["--format", "openvino", "--calibration-size", "0"], "calibration_size"),
        (["--format", "onnx", "--calibration", "."], "does not take option(s) ['calibration']"),
        (["--format", "checkpoint", "--precision", "fp16"], "takes no options"),
        (["--format", "openvino", "--calibration", "/no/such/folder"], "does not exist"),
        (["--format", "tensorrt"], "tensorrt"),
    ],
)
def test_bad_export_options_are_one_line_and_write_nothing(
    checkpoint, options, message, tmp_path, capsys
):
    out = tmp_path / "out"
    code = main(["export", "--ckpt", str(checkpoint), *options, "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    assert message in captured.err.replace("\n", " ")
    assert "Traceback" not in captured.err + captured.out
    assert len(captured.err.strip().splitlines()) <= 3  # one message, wrapped at most
    assert not out.exists()


def test_export_refuses_a_folder_with_files(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["export", "--ckpt", str(checkpoint), "--format", "onnx", "-o", str(out)])
    assert code == 1
    assert "not empty" in capsys.readouterr().err
    assert [path.name for path in out.iterdir()] == ["keep.txt"]


def test_export_help_lists_the_new_options(capsys):
    assert main(["export", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--precision", "--calibration", "--calibration-size", "openvino"):
        assert option in text


def test_run_config_takes_an_export_precision():
    config = resolve_config({"export": {"formats": ["openvino"], "precision": "int8"}})
    assert config.export_precision == "int8"
    assert config.to_dict()["export"] == {"formats": ["openvino"], "precision": "int8"}
    assert resolve_config({}).export_precision == "fp32"
    with pytest.raises(ConfigError, match=r"export\.precision"):
        resolve_config({"export": {"precision": "fp64"}})
    with pytest.raises(ConfigError, match="did you mean 'precision'"):
        resolve_config({"export": {"precison": "fp16"}})


def test_run_checks_export_precision_against_each_format_before_training():
    pm = get_plugin_manager()
    assert _export_options(pm, "checkpoint", "fp32") == {}
    assert _export_options(pm, "torch", "fp32") == {"precision": "fp32"}
    assert _export_options(pm, "openvino", "int8") == {"precision": "int8"}
    with pytest.raises(ConfigError, match="'onnx' writes precision \\['fp32'\\]"):
        _export_options(pm, "onnx", "int8")
    with pytest.raises(ConfigError, match="no precision option"):
        _export_options(pm, "checkpoint", "fp16")


def test_run_with_an_impossible_export_precision_fails_before_any_work(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("ANOMALY_CACHE_DIR", str(tmp_path / "cache"))
    results = tmp_path / "results"
    code = main(
        [
            "run",
            "--export.formats",
            "[torch]",
            "--export.precision",
            "int8",
            "--results_dir",
            str(results),
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert "'torch' writes precision ['fp32']" in captured.err.replace("\n", " ")
    assert not results.exists()
    assert not (tmp_path / "cache").exists()  # failed before the demo data was even made
