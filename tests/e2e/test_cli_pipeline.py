"""End-to-end runs of the ``anomaly`` command on tiny generated MVTec-layout data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from anomaly._cli import main


def _data_args(root: Path) -> list[str]:
    return [
        "--data",
        "mvtec_ad",
        "--data.root",
        str(root),
        "--data.category",
        "widget",
        "--data.image_size",
        "64",
        "--data.train_batch_size",
        "8",
        "--data.eval_batch_size",
        "8",
    ]


def _only_run(results: Path) -> Path:
    runs = [path for path in results.rglob("*") if (path / "config.yaml").is_file()]
    assert len(runs) == 1, runs
    return runs[0]


def test_run_writes_a_complete_results_folder(synthetic_mvtec, tmp_path, capsys):
    results = tmp_path / "results"
    code = main(["run", *_data_args(synthetic_mvtec), "--results_dir", str(results), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    folder = Path(report["results_dir"])
    assert folder == _only_run(results)
    assert folder.parts[-4:-1] == ("patchcore", "mvtec_ad", "widget")
    metrics = json.loads((folder / "metrics.json").read_text())
    assert set(metrics["metrics"]) >= {"image_auroc", "pixel_auroc", "aupro", "image_f1"}
    # The synthetic defects are bright blobs on texture: PatchCore must find them.
    assert metrics["metrics"]["image_auroc"] > 0.9
    assert metrics["metrics"]["pixel_auroc"] > 0.75  # coarse at 64 px: 4x4 feature maps
    assert (folder / "weights" / "model.ckpt").is_file()
    assert (folder / "export" / "torch" / "model.pt2").is_file()
    assert (
        json.loads((folder / "export" / "torch" / "metadata.json").read_text())["model"]
        == "patchcore"
    )
    assert len(list((folder / "images").rglob("*.png"))) == metrics["images"]
    rows = (folder / "predictions.csv").read_text().splitlines()
    assert rows[0] == "image_path,pred_score,pred_label,gt_label"
    assert len(rows) == metrics["images"] + 1
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model"]["name"] == "patchcore"
    assert config["data"]["category"] == "widget"
    assert not list(results.rglob("*.partial"))


def test_fit_then_test_predict_export_from_the_checkpoint(synthetic_mvtec, tmp_path, capsys):
    results = tmp_path / "results"
    args = [*_data_args(synthetic_mvtec), "--results_dir", str(results)]
    assert main(["fit", "--model", "padim", *args, "--json"]) == 0
    checkpoint = Path(json.loads(capsys.readouterr().out)["checkpoint"])
    assert checkpoint.is_file()
    torch.load(checkpoint, weights_only=True)

    assert main(["test", "--ckpt", str(checkpoint), *args, "--visualizer", "null", "--json"]) == 0
    tested = json.loads(capsys.readouterr().out)
    assert tested["model"] == "padim"
    assert tested["metrics"]["image_auroc"] > 0.8

    images = synthetic_mvtec / "widget" / "test"
    out = tmp_path / "predictions"
    assert (
        main(["predict", "--ckpt", str(checkpoint), "--output", str(out), str(images), "--json"])
        == 0
    )
    predicted = json.loads(capsys.readouterr().out)
    count = len(list(images.rglob("*.png")))
    assert len(predicted["predictions"]) == count
    folder = Path(predicted["results_dir"])
    assert len(list((folder / "images").rglob("*.png"))) == count
    assert (folder / "predictions.csv").is_file()

    export_dir = tmp_path / "export"
    assert main(["export", "--ckpt", str(checkpoint), "--output", str(export_dir)]) == 0
    assert (export_dir / "metadata.json").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--model", "patchcor"], "did you mean 'patchcore'"),
        (["run", "--data", "folder", "--data.root", "/no/such/folder"], "does not exist"),
        (["run", "--model.coreset_ratio", "7"], "coreset_ratio"),
        (["run", "--model.no_such_option", "1"], "unknown config key 'model.no_such_option'"),
        (["run", "--seed", "-3"], "seed"),
        (["run", "--config", "/no/such/run.yaml"], "cannot be read"),
        (["predict", "--ckpt", "/no/such.ckpt", "."], "does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_1_and_leaves_nothing(
    args, message, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    code = main([*args, "--results_dir", str(tmp_path / "results")] if args[0] == "run" else args)
    captured = capsys.readouterr()
    assert code == 1
    assert message in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert len(captured.err.strip().splitlines()) <= 3  # one message, wrapped at most
    assert not (tmp_path / "results").exists()


def test_corrupt_image_fails_before_any_results(tmp_path, capsys):
    root = tmp_path / "data"
    (root / "good").mkdir(parents=True)
    from PIL import Image

    for index in range(4):
        Image.new("RGB", (40, 40), (index * 10, 90, 90)).save(root / "good" / f"{index}.png")
    (root / "good" / "broken.png").write_bytes(b"\x89PNG not really")
    code = main(
        [
            "run",
            "--data",
            "folder",
            "--data.root",
            str(root),
            "--data.image_size",
            "64",
            "--results_dir",
            str(tmp_path / "results"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert "broken.png" in captured.err
    assert "Traceback" not in captured.err
    assert not (tmp_path / "results").exists()


def test_resolved_config_reproduces_the_run(synthetic_mvtec, tmp_path, capsys):
    results = tmp_path / "results"
    args = [*_data_args(synthetic_mvtec), "--model", "padim", "--visualizer", "null", "--json"]
    assert main(["train", *args, "--results_dir", str(results / "a")]) == 0
    first = json.loads(capsys.readouterr().out)
    config = Path(first["results_dir"]) / "config.yaml"
    assert (
        main(["train", "--config", str(config), "--results_dir", str(results / "b"), "--json"]) == 0
    )
    second = json.loads(capsys.readouterr().out)
    assert second["metrics"] == pytest.approx(first["metrics"], nan_ok=True)
